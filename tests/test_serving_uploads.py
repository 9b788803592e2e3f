"""Uploaded images are decoded only after the request is admitted (a full queue refuses them
undecoded, and at most ``max_concurrency`` decode at once); volume and slice limits are applied from
the header and answered 413 naming the limit; a NIfTI volume is never converted whole; NIfTI axes
are taken by name or by RAS voxel number, as the CLI takes them."""

from __future__ import annotations

import asyncio
import base64
import threading
import tracemalloc

import numpy as np
import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from serving_helpers import RunningServer, free_port  # noqa: E402


def nifti_bytes(volume: np.ndarray, tmp_path, name="v.nii.gz") -> bytes:
    import nibabel as nib

    nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / name)
    return (tmp_path / name).read_bytes()


def data_url(data: bytes) -> str:
    return "data:application/octet-stream;base64," + base64.b64encode(data).decode()


def chat_with(url: str, **options) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url, **options}},
                                                      {"type": "text", "text": "Describe."}]}], "max_tokens": 2, "temperature": 0}


@pytest.fixture(scope="module")
def server(pipe):
    from unimedvl.serving import ServeConfig, create_app

    config = ServeConfig(max_image_side=64, min_image_side=16, max_steps=4, max_new_tokens=8, max_image_pixels=64 * 64,
                         max_volume_voxels=64 * 64 * 40, max_body_bytes=2_000_000, request_timeout_s=120, ui=False)
    app = create_app(pipe, config)
    running = RunningServer(app, free_port())
    running.app = app
    yield running
    running.stop()


def post(server, path, body):
    return httpx.post(server.url + path, json=body, timeout=120)


# ---- decoding under admission -----------------------------------------------------------------


def test_a_full_queue_refuses_uploads_without_decoding_them(server, tmp_path, monkeypatch):
    import unimedvl.serving.app as app_module

    decoded = []
    real = app_module.image_from_url
    monkeypatch.setattr(app_module, "image_from_url", lambda *a, **k: decoded.append(1) or real(*a, **k))
    url = data_url(nifti_bytes(np.ones((32, 32, 8), np.float32), tmp_path))
    worker = server.app.app.state.worker
    held = [worker.admit() for _ in range(worker.capacity)]
    try:
        for stream in (False, True):
            r = post(server, "/v1/chat/completions", {**chat_with(url), "stream": stream})
            assert r.status_code == 429, r.text
    finally:
        for _ in held:
            worker.release()
    assert decoded == []  # refused before a byte of the volume was decoded
    assert post(server, "/v1/chat/completions", chat_with(url)).status_code == 200
    assert decoded == [1]


def test_at_most_max_concurrency_uploads_decode_at_once():
    from unimedvl.serving.worker import ModelWorker

    worker = ModelWorker(max_concurrency=2, max_queue=8, timeout_s=30)
    lock, active, peak = threading.Lock(), [0], [0]

    def decode():
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        threading.Event().wait(0.05)
        with lock:
            active[0] -= 1

    async def main():
        return await asyncio.gather(*(worker.run(lambda tok: "ok", prepare=decode) for _ in range(8)))

    assert asyncio.run(main()) == ["ok"] * 8
    assert peak[0] == 2 and worker.admitted == 0
    worker.shutdown()


def test_a_failing_upload_releases_its_slot_and_reports_its_own_error():
    from unimedvl.serving.errors import APIError, bad_request
    from unimedvl.serving.worker import ModelWorker

    worker = ModelWorker(max_concurrency=1, max_queue=0, timeout_s=30)
    ran = []

    def bad():
        raise bad_request("image[0]: not a readable image", "image[0]")

    with pytest.raises(APIError) as err:
        asyncio.run(worker.run(lambda tok: ran.append(1), prepare=bad))
    assert err.value.status == 400 and err.value.param == "image[0]" and ran == [] and worker.admitted == 0
    assert asyncio.run(worker.run(lambda tok: "next")) == "next"  # the slot is free again
    worker.shutdown()


# ---- limits from the header ------------------------------------------------------------------


def test_a_volume_over_max_volume_voxels_is_a_413_naming_the_limit(server, tmp_path):
    url = data_url(nifti_bytes(np.zeros((64, 64, 41), np.int16), tmp_path))  # one slice over 64*64*40
    r = post(server, "/v1/chat/completions", chat_with(url))
    assert r.status_code == 413, r.text
    error = r.json()["error"]
    assert error["code"] == "image_too_large" and "max_volume_voxels" in error["message"] and "167936 voxels" in error["message"]
    assert "/tmp" not in error["message"]


@pytest.mark.parametrize("axis", ["sagittal", 0, "0"])
def test_a_slice_over_max_image_pixels_is_a_413_for_that_axis_only(server, tmp_path, axis):
    # 80 x 40 x 30: an axial slice has 80*40 = 3200 pixels (allowed), a sagittal one 40*30 = 1200,
    # a coronal one 80*30 = 2400; a 70 x 70 x 4 volume's axial slice (4900) is over 64*64 = 4096
    url = data_url(nifti_bytes(np.zeros((80, 40, 30), np.int16), tmp_path))
    assert post(server, "/v1/chat/completions", chat_with(url, axis=axis)).status_code == 200
    big = data_url(nifti_bytes(np.zeros((70, 70, 4), np.int16), tmp_path, "big.nii.gz"))
    r = post(server, "/v1/chat/completions", chat_with(big, axis="axial"))
    assert r.status_code == 413 and "max_image_pixels" in r.json()["error"]["message"]
    assert post(server, "/v1/chat/completions", chat_with(big, axis=axis)).status_code == 200


def test_a_dicom_frame_over_max_image_pixels_is_a_413(server):
    from pydicom.data import get_testdata_file

    data = open(get_testdata_file("CT_small.dcm"), "rb").read()  # 128 x 128 = 16384 pixels, over 64 * 64
    r = post(server, "/v1/chat/completions", chat_with(data_url(data)))
    assert r.status_code == 413, r.text
    assert "16384 pixels" in r.json()["error"]["message"] and "max_image_pixels" in r.json()["error"]["message"]


@pytest.mark.parametrize("axis, bright", [("axial", 2), (2, 2), ("2", 2), ("sagittal", 0), (0, 0), ("coronal", 1), (1, 1)])
def test_nifti_axes_by_name_or_ras_number(server, tmp_path, pipe, axis, bright):
    from unimedvl.serving.config import ServeConfig
    from unimedvl.serving.images import ReadOptions, decode_image

    volume = np.zeros((20, 24, 28), np.float32)
    index = {0: 5, 1: 6, 2: 7}[bright]
    np.moveaxis(volume, bright, 0)[index] = 100.0  # only this slice along this axis is bright
    data = nifti_bytes(volume, tmp_path)
    options = ReadOptions.parse({"axis": axis, "slice_index": index}, "image")
    image = np.asarray(decode_image(data, options, ServeConfig(), "image"))
    assert image.min() == 255  # the whole plane is the bright slice
    assert post(server, "/v1/chat/completions", chat_with(data_url(data), axis=axis, slice_index=index)).status_code == 200


@pytest.mark.parametrize("axis", [3, -1, True, "oblique", "3", 1.0])
def test_unknown_axes_are_a_400_naming_the_field(server, tmp_path, axis):
    url = data_url(nifti_bytes(np.zeros((8, 8, 8), np.int16), tmp_path))
    r = post(server, "/v1/chat/completions", chat_with(url, axis=axis))
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"].endswith(".axis") and "0, 1 or 2" in r.json()["error"]["message"]


# ---- no whole-volume conversion ------------------------------------------------------------------


@pytest.mark.parametrize("axis", ["axial", "coronal", "sagittal"])
def test_a_compressed_volume_is_read_a_slice_at_a_time(tmp_path, axis):
    from unimedvl.serving.config import ServeConfig
    from unimedvl.serving.images import ReadOptions, decode_image

    volume = np.zeros((400, 400, 200), np.int16)  # 64 MB as stored, 256 MB as float64; ~0.3 MB gzipped
    volume[::7, ::5, ::3] = 100
    data = nifti_bytes(volume, tmp_path)
    del volume
    tracemalloc.start()
    try:
        image = decode_image(data, ReadOptions(axis=axis), ServeConfig(), "image")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert image.size[0] == 400
    assert peak < 64e6, f"decoding took {peak / 1e6:.0f} MB: more than the volume as stored"
