"""``unimedvl serve``: the OpenAI-compatible HTTP API and the web UI."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from .common import CompileOpt, DeviceMapOpt, DeviceOpt, DtypeOpt, MaxMemoryOpt, QuantizeOpt, ModelOpt, fail, load_pipeline, read_options


def startup_line(name: str, host: str, port: int, *, ui: bool, api_key: bool) -> str:
    """What the server announces: the routes it really serves (``/ui`` only when the UI is mounted)."""
    parts = ["API: /v1"] + (["UI: /ui"] if ui else []) + ["docs: /docs", "schema: /openapi.json"]
    return f"serving {name} on http://{host}:{port}  ({', '.join(parts)})" + ("" if api_key else "  [no API key: loopback only]")


def serve(
    model: Optional[Path] = ModelOpt,
    host: str = typer.Option("127.0.0.1", "--host", help="Listen address; anything but loopback requires --api-key."),
    port: int = typer.Option(8000, "--port", help="TCP port, 1..65535."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="UNIMEDVL_API_KEY", help="Bearer key required on /v1, /metrics and /ui."),
    max_concurrency: int = typer.Option(1, "--max-concurrency", help="Requests running on the model at once."),
    max_queue: int = typer.Option(16, "--max-queue", help="Requests waiting beyond those; more are refused with 429."),
    max_batch: int = typer.Option(16, "--max-batch", help="Chat answers decoded together, one forward per step for all (1: one at a time)."),
    max_image_batch: int = typer.Option(4, "--max-image-batch",
                                        help="Text-to-image images of one size and setting denoised together (1: one at a time)."),
    timeout: float = typer.Option(300.0, "--timeout", help="Seconds a request may queue and run before it is cancelled (504)."),
    allow_files: list[Path] = typer.Option([], "--allow-files", help="Folder whose files image_url may name (repeatable); none by default."),
    max_image_side: int = typer.Option(1024, "--max-image-side", help="Largest generated width/height."),
    max_image_pixels: int = typer.Option(4096 * 4096, "--max-image-pixels",
                                         help="Largest uploaded image (a DICOM frame or NIfTI slice), checked before decoding (413)."),
    max_volume_voxels: int = typer.Option(1024 * 1024 * 512, "--max-volume-voxels",
                                          help="Largest uploaded NIfTI volume, from its header (413); only the asked slice is decoded."),
    no_ui: bool = typer.Option(False, "--no-ui", help="Serve the API only."),
    malloc_mmap_threshold: Optional[int] = typer.Option(None, "--malloc-mmap-threshold",
                                                        help="Host allocations of at least this many bytes go back to the OS when freed "
                                                             "(glibc; keeps RSS flat under image load; default 262144). 0: glibc's adaptive threshold."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    quantize: Optional[str] = QuantizeOpt,
    device_map: Optional[str] = DeviceMapOpt,
    max_memory: Optional[str] = MaxMemoryOpt,
    compile: bool = CompileOpt,
) -> None:
    """Serve the model: OpenAI-compatible HTTP API (/v1/...) and the web UI (/ui)."""
    import uvicorn

    from ..serving import ServeConfig, create_app
    from ..serving.config import uvicorn_log_config

    try:
        config = ServeConfig(host=host, port=port, api_key=api_key, max_concurrency=max_concurrency, max_queue=max_queue, max_batch=max_batch,
                             max_image_batch=max_image_batch,
                             request_timeout_s=timeout, allowed_file_roots=tuple(allow_files), max_image_side=max_image_side,
                             max_image_pixels=max_image_pixels, max_volume_voxels=max_volume_voxels, ui=not no_ui,
                             **({} if malloc_mmap_threshold is None else {"malloc_mmap_threshold": malloc_mmap_threshold or None}))
    except ValueError as e:
        fail(str(e))
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from ..serving.host_memory import apply_host_memory_policy, model_thread_trimmer
    from ..serving.model_thread import ModelThread

    apply_host_memory_policy(config)  # process-wide, before the model's allocations
    model_thread = ModelThread(after_call=model_thread_trimmer(config))  # loads the model and runs every forward (one OpenMP team: see serving.model_thread)
    pipe = model_thread.run(load_pipeline, model, device, dtype, read_options(), quantize=quantize,
                            device_map=device_map, max_memory=max_memory, compile=compile)
    application = create_app(pipe, config, model_thread=model_thread)
    typer.echo(startup_line(pipe.name, host, port, ui=application.app.state.ui, api_key=bool(api_key)))
    # uvicorn's access lines could carry query strings; ours carry the route template, status and latency
    uvicorn.run(application, host=host, port=port, log_level="info", access_log=False, log_config=uvicorn_log_config())
