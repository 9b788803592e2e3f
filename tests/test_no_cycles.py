"""Finished work is freed when its last reference goes, not at Python's next cyclic collection:
a dropped context's KV buffers (megabytes per layer on a real model) and what a served request
leaves behind.  Reference cycles there made the server's memory rise run after run."""

from __future__ import annotations

import gc
import weakref

import httpx
import torch

from serving_helpers import RunningServer, free_port, png_data_url


def test_a_dropped_context_and_its_fork_free_their_buffers_at_once(pipe):
    engine = pipe.engine
    ids = pipe.tokenizer.encode("Is there a pleural effusion on this radiograph?")
    gc.disable()
    try:
        ctx = engine.new_context()
        engine.add_text(ctx, ids)
        fork = ctx.fork()
        engine.add_text(fork, ids[:3])  # the fork writes past the shared prefix, then the parent does:
        engine.add_text(ctx, ids[:2])  # copy-on-write gives one of them a store of its own
        stores = {id(c._store): c._store for c in (ctx, fork)}
        assert len(stores) == 2
        buffers = [weakref.ref(s.keys[0]) for s in stores.values()]
        del ctx, fork, stores
        assert all(ref() is None for ref in buffers), "a KV buffer outlived its context (a reference cycle)"
    finally:
        gc.enable()


def test_served_requests_leave_no_cyclic_garbage_holding_tensors_or_requests(pipe):
    from unimedvl.serving import ServeConfig, create_app

    key = "cycle-key"
    server = RunningServer(create_app(pipe, ServeConfig(api_key=key, max_image_side=64, min_image_side=16, max_steps=4, ui=False)),
                           free_port())
    headers = {"authorization": f"Bearer {key}"}
    content = [{"type": "image_url", "image_url": {"url": png_data_url(1)}}, {"type": "text", "text": "Which modality?"}]
    try:
        with httpx.Client(base_url=server.url, timeout=120, headers=headers) as client:
            client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": content}], "max_tokens": 4})
            gc.collect()
            gc.set_debug(gc.DEBUG_SAVEALL)
            try:
                for n in range(4):
                    r = client.post("/v1/chat/completions",
                                    json={"messages": [{"role": "user", "content": content}], "max_tokens": 4, "temperature": 0})
                    assert r.status_code == 200
                r = client.post("/v1/images/generations", json={"prompt": "axial brain MRI", "size": "32x32", "steps": 3})
                assert r.status_code == 200
                gc.collect()
                garbage = list(gc.garbage)
            finally:
                gc.set_debug(0)
                gc.garbage.clear()
    finally:
        server.stop()
    tensors = [o for o in garbage if isinstance(o, torch.Tensor)]
    server_side = [o for o in garbage if type(o).__module__.startswith(("starlette", "fastapi", "unimedvl", "asyncio", "anyio"))
                   or isinstance(o, BaseException)]
    assert not tensors, f"{len(tensors)} tensors were only freed by the cyclic collector"
    assert len(server_side) < 20, sorted({type(o).__qualname__ for o in server_side})
