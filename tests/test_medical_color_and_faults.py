"""Colour DICOM read through pydicom's own colour functions, pixel faults refused (or a documented
fallback) instead of black images, --axis 0/1/2, clean decode errors, and NIfTI volumes read one
slice at a time within a header-checked size limit."""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import typer
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.pixels import apply_color_lut, convert_color_space, pixel_array

from unimedvl.formats.medical_io import MedicalImageError, read_dicom, read_medical_image, read_nifti, read_raster


# ---- colour DICOM ----------------------------------------------------------------------------


def _colour_files() -> list[str]:
    """Every pydicom / pydicom-data test file with pixel data that is not MONOCHROME*."""
    found = []
    for path in sorted(get_testdata_files("*")):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:
            continue
        pi = str(ds.get("PhotometricInterpretation", ""))
        if pi and not pi.startswith("MONOCHROME") and "PixelData" in pydicom.dcmread(path, specific_tags=["PixelData"]):
            found.append(path)
    return found


COLOUR_FILES = _colour_files()


def _u8(arr: np.ndarray, bits: int) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    return np.round(np.clip(arr.astype(np.float64) / (2 ** bits - 1), 0, 1) * 255).astype(np.uint8)


def test_the_colour_corpus_is_the_expected_one():
    names = {Path(p).name for p in COLOUR_FILES}
    # palettes (segmented and not), YBR variants, planar configuration 1, 16/32-bit RGB
    assert {"OBXXXX1A.dcm", "examples_palette.dcm", "gdcm-US-ALOKA-16.dcm", "SC_ybr_full_422_uncompressed.dcm",
            "SC_ybr_full_uncompressed.dcm", "examples_ybr_color.dcm", "color-pl.dcm", "SC_rgb_16bit.dcm", "SC_rgb_32bit.dcm"} <= names
    assert len(COLOUR_FILES) >= 50


@pytest.mark.parametrize("path", COLOUR_FILES, ids=[Path(p).name for p in COLOUR_FILES])
def test_colour_dicom_equals_pydicoms_colour_functions(path):
    ds = pydicom.dcmread(path)
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    frames = sorted({0, n_frames - 1})
    for frame in frames:
        index = frame if n_frames > 1 else None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ref = pixel_array(path, index=index)  # pydicom's decoding, YBR converted to RGB by default
        except Exception as e:
            pytest.skip(f"pydicom cannot decode this file here ({type(e).__name__}: {' '.join(str(e).split())[:200]})")
        if n_frames > 1 and ref.ndim == (4 if ds.SamplesPerPixel > 1 else 3):
            ref = ref[0]
        pi = str(ds.PhotometricInterpretation)
        if pi == "PALETTE COLOR":
            lut = apply_color_lut(ref, ds)
            expected = _u8(lut, 8 if lut.dtype == np.uint8 else int(ds.RedPaletteColorLookupTableDescriptor[2]))
        else:
            expected = _u8(ref, int(ds.BitsStored))
        got = read_medical_image(path, **({"frame": frame} if frame else {}))
        assert got.pixels.dtype == np.uint8 and got.pixels.shape == expected.shape, (frame, got.pixels.shape, expected.shape)
        assert np.array_equal(got.pixels, expected), (frame, np.abs(got.pixels.astype(int) - expected).max())
        if pi == "PALETTE COLOR":  # not grey palette indices
            assert not np.array_equal(got.pixels[..., 0], got.pixels[..., 1]) or not np.array_equal(got.pixels[..., 1], got.pixels[..., 2])


@pytest.mark.parametrize("name", ["SC_ybr_full_uncompressed.dcm", "SC_ybr_full_422_uncompressed.dcm"])
def test_uncompressed_ybr_equals_convert_color_space_of_the_raw_data(name):
    path = get_testdata_file(name)
    ds = pydicom.dcmread(path)
    raw = pixel_array(path, raw=True)  # the stored YBR samples (422 already upsampled by the decoder)
    expected = convert_color_space(raw, str(ds.PhotometricInterpretation), "RGB")
    assert np.array_equal(read_medical_image(path).pixels, expected)
    # and the colours are really converted: the raw YBR samples differ from RGB a lot
    assert np.abs(raw.astype(int) - expected.astype(int)).max() > 50


def test_planar_configuration_one_is_interleaved():
    a = read_medical_image(get_testdata_file("color-pl.dcm")).pixels  # planar configuration 1
    b = read_medical_image(get_testdata_file("color-px.dcm")).pixels  # the same image, interleaved
    assert np.array_equal(a, b)


def test_sixteen_bit_colour_is_scaled_by_its_bit_depth_not_its_range():
    path = get_testdata_file("SC_rgb_16bit.dcm")
    ref = pixel_array(path)
    got = read_medical_image(path).pixels
    assert np.array_equal(got, np.round(ref / 65535 * 255).astype(np.uint8))
    assert np.array_equal(read_medical_image(get_testdata_file("SC_rgb.dcm")).pixels, got)  # the 8-bit twin


def test_demo_corpus_stages_the_colour_ultrasound(tmp_path):
    from unimedvl.data.demo import stage_dicoms

    staged = stage_dicoms(tmp_path)
    assert "OBXXXX1A.dcm" in staged
    path = tmp_path / "OBXXXX1A.dcm"
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "PALETTE COLOR"
    image = read_medical_image(path)
    lut = apply_color_lut(ds.pixel_array, ds)  # 16-bit palette entries
    assert lut.dtype == np.uint16 and list(ds.RedPaletteColorLookupTableDescriptor)[2] == 16
    assert np.array_equal(image.pixels, _u8(lut, 16))
    # the colour ultrasound: a good share of pixels is coloured (not grey)
    px = image.pixels.astype(int)
    coloured = (np.abs(px[..., 0] - px[..., 1]) + np.abs(px[..., 1] - px[..., 2])) > 30
    assert coloured.mean() > 0.01


def test_demo_dicom_adapter_sees_the_colour_ultrasound(tmp_path):
    """The demo corpus goes through the DICOM adapter, which uses read_dicom with the dataset it read."""
    from unimedvl.formats.medical_io import read_dicom_dataset

    path = get_testdata_file("OBXXXX1A.dcm")
    ds = read_dicom_dataset(path)
    image = read_dicom(path, dataset=ds)
    assert np.array_equal(image.pixels, _u8(apply_color_lut(pydicom.dcmread(path).pixel_array, ds), 16))


# ---- pixel faults ----------------------------------------------------------------------------


def _ct(tmp_path, name="CT.dcm", **changes) -> Path:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for key, value in changes.items():
        setattr(ds, key, value)
    path = tmp_path / name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("text", ["nan,nan", "40,nan", "nan,400", "inf,400", "40,inf", "40,0", "40,-5"])
def test_cli_window_must_be_finite_with_a_positive_width(text, capsys):
    from unimedvl.cli.common import read_options

    with pytest.raises(typer.Exit) as exc:
        read_options(window=text)
    assert exc.value.exit_code == 2
    err = capsys.readouterr().err
    assert "--window" in err and text in err and "finite" in err


def test_cli_window_preset_and_values_still_accepted():
    from unimedvl.cli.common import read_options

    assert read_options(window="40,400").window == (40.0, 400.0)
    assert read_options(window="lung").window == "lung"
    with pytest.raises(typer.Exit):
        read_options(window="lungs")


@pytest.mark.parametrize("window", [(math.nan, math.nan), (40.0, math.nan), (math.inf, 400.0), (40.0, 0.0)])
def test_python_api_window_is_refused_naming_the_file(window, tmp_path):
    from unimedvl.inference import ImageReadOptions
    from unimedvl.inference.inputs import load_image

    path = _ct(tmp_path)
    with pytest.raises(MedicalImageError, match=r"CT\.dcm: window (center|width) is"):
        load_image(path, ImageReadOptions(window=window))


def test_http_json_nan_window_is_a_400(tmp_path):
    import json

    from unimedvl.serving.config import ServeConfig
    from unimedvl.serving.errors import APIError
    from unimedvl.serving.images import ReadOptions, decode_image

    raw = json.loads('{"window": [NaN, NaN]}')  # Python's json accepts NaN literals
    options = ReadOptions.parse(raw, "image")
    with pytest.raises(APIError) as exc:
        decode_image(_ct(tmp_path).read_bytes(), options, ServeConfig(), "image")
    assert exc.value.status == 400 and "window" in exc.value.message and "nan" in exc.value.message


@pytest.mark.parametrize("width", ["0", "0.5", "-10"])
def test_file_window_width_zero_falls_back_to_the_full_range_with_a_warning(width, tmp_path, caplog):
    path = _ct(tmp_path, WindowCenter="40", WindowWidth=width)
    no_window = tmp_path / "none.dcm"
    ds = pydicom.dcmread(path)
    del ds.WindowCenter, ds.WindowWidth
    ds.save_as(no_window)
    with caplog.at_level(logging.WARNING, logger="unimedvl.formats.medical_io"):
        image = read_medical_image(path)
    assert image.meta["window"] is None and image.meta["window_ignored"] == f"WindowWidth is {float(width)}"
    assert np.array_equal(image.pixels, read_medical_image(no_window).pixels)  # min-max, as without a window
    assert len(np.unique(image.pixels)) > 50  # a real image, not black or binary
    assert any("CT.dcm" in r.getMessage() and "WindowWidth" in r.getMessage() for r in caplog.records)
    # the log carries no pixel values and no identifiers
    assert all(str(ds.PatientName) not in r.getMessage() for r in caplog.records if str(ds.PatientName))


def test_explicit_window_overrides_a_bad_file_window(tmp_path):
    path = _ct(tmp_path, WindowCenter="40", WindowWidth="0")
    image = read_medical_image(path, window=(40.0, 400.0))
    assert image.meta["window"] == {"center": 40.0, "width": 400.0, "source": "explicit"}


@pytest.mark.parametrize("field,value", [("RescaleSlope", "nan"), ("RescaleSlope", "0"), ("RescaleSlope", "inf"),
                                         ("RescaleIntercept", "nan")])
def test_bad_rescale_is_refused_naming_file_and_field(field, value, tmp_path):
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds[field].value = value
    path = tmp_path / "CT.dcm"
    # pydicom may refuse to write 'nan' as DS: read_dicom is then given the dataset directly
    with pytest.raises(MedicalImageError, match=rf"CT\.dcm: {field} is {float(value)}; expected a finite"):
        read_dicom(path, dataset=ds)


def test_float_tiff_with_one_nan_is_refused(tmp_path):
    import tifffile

    data = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    tifffile.imwrite(tmp_path / "ok.tif", data)
    assert len(np.unique(read_raster(tmp_path / "ok.tif").pixels)) > 200
    data[10, 10] = np.nan
    tifffile.imwrite(tmp_path / "nan.tif", data)
    with pytest.raises(MedicalImageError, match=r"nan\.tif: 1 pixel values are NaN/infinite"):
        read_medical_image(tmp_path / "nan.tif")


def test_nifti_nan_in_the_shown_slice_is_refused(tmp_path):
    data = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    data[2, 2, 3] = np.nan
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "nan.nii.gz")
    with pytest.raises(MedicalImageError, match=r"nan\.nii\.gz: .*1 NaN/infinite voxels"):
        read_nifti(tmp_path / "nan.nii.gz", slice_index=3)


# ---- --axis 0/1/2 ----------------------------------------------------------------------------


def _volume(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(rng.normal(size=(7, 8, 9)).astype(np.float32), np.eye(4)), path)
    return path


@pytest.mark.parametrize("number,name", [("0", "sagittal"), ("1", "coronal"), ("2", "axial")])
def test_axis_numbers_are_accepted_as_the_help_says(number, name, tmp_path):
    from unimedvl.cli.common import read_options
    from unimedvl.inference.inputs import load_image

    path = _volume(tmp_path)
    options = read_options(axis=number)
    got = np.array(load_image(path, options))
    assert np.array_equal(got, read_nifti(path, axis=name).pixels)
    assert np.array_equal(read_nifti(path, axis=int(number)).pixels, got)


def test_bad_axis_is_refused_on_the_command_line(capsys):
    from unimedvl.cli.common import AxisOpt, read_options

    assert "0/1/2" in AxisOpt.help
    with pytest.raises(typer.Exit):
        read_options(axis="3")
    assert "--axis '3'" in capsys.readouterr().err


# ---- undecodable compressed pixel data: a clean error ----------------------------------------


def _garbage_jpeg(tmp_path) -> Path:
    from pydicom.encaps import encapsulate

    ds = pydicom.dcmread(get_testdata_file("SC_rgb_jpeg_lossy_gdcm.dcm"))
    ds.PixelData = encapsulate([b"\xff\xd8" + b"not a jpeg stream " * 20])
    path = tmp_path / "garbage.dcm"
    ds.save_as(path)
    return path


def test_undecodable_jpeg_gives_one_clean_error_and_no_pydicom_traceback(tmp_path, capfd):
    path = _garbage_jpeg(tmp_path)
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)  # as the CLI's logging.basicConfig
    root.addHandler(handler)
    try:
        with pytest.raises(MedicalImageError, match=r"garbage\.dcm: cannot decode pixel data \(transfer syntax 1\.2\.840\.10008\.1\.2\.4\.50\)") as exc:
            read_medical_image(path)
    finally:
        root.removeHandler(handler)
    assert exc.value.__cause__ is None and exc.value.__suppress_context__
    err = capfd.readouterr().err
    assert "Traceback" not in err and "pydicom" not in err
    assert logging.getLogger("pydicom").level == logging.WARNING  # restored after decoding


def test_cli_ask_with_undecodable_jpeg_prints_only_our_error(tmp_path):
    fixture = Path("/work/shared/fixtures/official_tiny_a")
    if not fixture.is_dir():
        pytest.skip("the official_tiny_a fixture model is not on this machine")
    path = _garbage_jpeg(tmp_path)
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    r = subprocess.run([sys.executable, "-c", "from unimedvl.cli import main; main()", "ask", str(path), "-q", "What is shown?",
                        "-m", str(fixture), "--dtype", "fp32", "--max-new-tokens", "1"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode != 0
    assert "cannot decode pixel data" in r.stderr and "garbage.dcm" in r.stderr
    assert "Traceback" not in r.stderr and "pydicom.pixels" not in r.stderr


# ---- NIfTI memory and size limit -------------------------------------------------------------


PROBE = """
import sys, tracemalloc, resource
from unimedvl.formats.medical_io import read_nifti
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
tracemalloc.start()
image = read_nifti(sys.argv[1], axis="axial")
peak = tracemalloc.get_traced_memory()[1]
rss = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024
print(peak, rss, *image.pixels.shape[:2])
"""


def test_big_compressed_nifti_is_read_one_slice_with_bounded_memory(tmp_path):
    v = np.zeros((600, 600, 300), np.uint8)
    v[200:400, 200:400, 100:200] = 200
    v[250:350, 250:350, 140:160] = 90
    path = tmp_path / "big.nii.gz"
    nib.save(nib.Nifti1Image(v, np.eye(4)), path)
    del v
    assert path.stat().st_size < 2_000_000  # small on disk, 108 M voxels (864 MB as float64)
    r = subprocess.run([sys.executable, "-c", PROBE, str(path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    peak, rss, h, w = (int(x) for x in r.stdout.split())
    assert (h, w) == (600, 600)
    full_float64 = 600 * 600 * 300 * 8
    assert peak < full_float64 / 8, peak  # < 108 MB traced (the whole volume as uint8); measured ~67 MB
    assert rss < full_float64 / 4, rss


def test_volume_over_the_limit_is_refused_from_the_header_before_decoding(tmp_path):
    # a header claiming 2000 x 2000 x 1000 voxels over a few bytes of data: refused before reading
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((2000, 2000, 1000))
    hdr.set_data_dtype(np.uint8)
    path = tmp_path / "huge.nii"
    with open(path, "wb") as f:
        f.write(hdr.binaryblock + b"\x00" * 4 + b"\x00" * 64)
    with pytest.raises(MedicalImageError, match=r"huge\.nii: the volume's shape \[2000, 2000, 1000\] has 4000000000 voxels, "
                                                 r"over the limit of 536870912 voxels; nothing was decoded"):
        read_medical_image(path)
    # an explicit lower limit applies the same way
    small = _volume(tmp_path)
    with pytest.raises(MedicalImageError, match=r"shape \[7, 8, 9\] has 504 voxels, over the limit of 100 voxels"):
        read_nifti(small, max_voxels=100)
    with pytest.raises(MedicalImageError, match=r"72 pixels, over the limit of 50 pixels"):
        read_nifti(small, axis="sagittal", max_pixels=50)


def test_reading_one_slab_equals_the_canonical_whole_volume(tmp_path):
    from unimedvl.formats.medical_io import load_nifti_volume, nifti_plane

    rng = np.random.default_rng(1)
    data = rng.normal(size=(5, 6, 7)).astype(np.float32)
    affine = np.array([[0, 0, -2.0, 10], [-1.5, 0, 0, 5], [0, 3.0, 0, -4], [0, 0, 0, 1]])  # permuted and flipped axes
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "p.nii.gz")
    full, zooms = load_nifti_volume(tmp_path / "p.nii.gz")
    lo, hi = full.min(), full.max()
    for axis in range(3):
        for index in range(full.shape[axis]):
            image = read_nifti(tmp_path / "p.nii.gz", axis=axis, slice_index=index, percentiles=(0, 100))
            expected = np.round(np.clip((nifti_plane(full, axis, index) - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)
            assert np.array_equal(image.pixels[..., 0], expected), (axis, index)
    assert image.meta["voxel_size_mm"] == pytest.approx(zooms)
