"""Medical image readers on real sample files shipped by pydicom, pydicom-data and nibabel, and on
volumes written by the tests with known orientation.  Assertions are about pixels."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_modality_lut

from unimedvl.formats.medical_io import MedicalImageError, apply_window, read_dicom, read_medical_image, read_nifti


def _hu(name):
    ds = pydicom.dcmread(get_testdata_file(name))
    return ds, apply_modality_lut(ds.pixel_array, ds).astype(np.float64)


def test_ct_rescale_and_named_window_presets():
    ds, hu = _hu("CT_small.dcm")
    assert float(ds.RescaleIntercept) != 0  # the rescale matters for this file
    lung = read_dicom(get_testdata_file("CT_small.dcm"), window="lung")
    expected = np.round(apply_window(hu, -600.0, 1500.0) * 255).astype(np.uint8)
    assert np.array_equal(lung.pixels[..., 0], expected)
    bone = read_dicom(get_testdata_file("CT_small.dcm"), window="bone")
    assert not np.array_equal(lung.pixels, bone.pixels)
    # a voxel at the window centre maps to mid grey; values beyond the window saturate
    assert apply_window(np.array([-600.0, -1400.0, 200.0]), -600.0, 1500.0).round(3).tolist() == [0.5, 0.0, 1.0]
    assert lung.meta["window"] == {"center": -600.0, "width": 1500.0, "source": "preset:lung"}
    assert "PatientName" not in str(lung.meta) and str(ds.PatientName) not in str(lung.meta)


def test_window_from_the_file_and_explicit_values():
    ds, values = _hu("MR2_UNCR.dcm")  # pydicom-data MR with a window and a rescale slope of 3.77
    own = read_dicom(get_testdata_file("MR2_UNCR.dcm"))
    c, w = float(ds.WindowCenter), float(ds.WindowWidth)
    assert own.meta["window"]["source"] == "file" and float(ds.RescaleSlope) != 1
    assert np.array_equal(own.pixels[..., 0], np.round(apply_window(values, c, w) * 255).astype(np.uint8))
    explicit = read_dicom(get_testdata_file("MR2_UNCR.dcm"), window=(c, w))
    assert np.array_equal(explicit.pixels, own.pixels)
    # no window in the file: the full range is used
    ct = read_dicom(get_testdata_file("CT_small.dcm"))
    assert ct.meta["window"] is None and ct.pixels.min() == 0 and ct.pixels.max() == 255


def test_monochrome1_chest_radiograph_is_inverted():
    path = get_testdata_file("RG3_UNCR.dcm")  # pydicom-data: a MONOCHROME1 CR chest radiograph
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    image = read_dicom(path, window=(1000.0, 2000.0))
    values = apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
    direct = np.round(apply_window(values, 1000.0, 2000.0) * 255).astype(np.uint8)
    assert np.array_equal(image.pixels[..., 0], 255 - direct)
    assert image.pixels.shape == (ds.Rows, ds.Columns, 3)
    # with a window below the brightest value, the highest stored value is drawn black
    low = read_dicom(path, window=(float(values.min()) + 2.0, 2.0))
    r, c = np.unravel_index(np.argmax(values), values.shape)
    assert low.pixels[r, c, 0] == 0 and low.pixels[np.unravel_index(np.argmin(values), values.shape)][0] == 255


def test_multi_frame_choice_and_bounds():
    path = get_testdata_file("emri_small.dcm")
    ds = pydicom.dcmread(path)
    n = int(ds.NumberOfFrames)
    f3 = read_dicom(path, frame=3)
    f0 = read_dicom(path, frame=0)
    assert f3.meta["num_frames"] == n > 3 and not np.array_equal(f3.pixels, f0.pixels)
    with pytest.raises(MedicalImageError, match=rf"emri_small\.dcm: frame {n} requested but the file has {n} frames"):
        read_dicom(path, frame=n)


def test_corrupt_dicom_is_reported_with_the_file_name(tmp_path):
    data = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    bad = tmp_path / "truncated.dcm"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(MedicalImageError, match="truncated.dcm"):
        read_dicom(bad)
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    with pytest.raises(MedicalImageError, match="empty.dcm"):
        read_medical_image(empty)
    with pytest.raises(MedicalImageError, match="unknown window preset 'liver'"):
        read_dicom(get_testdata_file("CT_small.dcm"), window="liver")


def _volume_with_marker():
    data = np.zeros((8, 10, 6), dtype=np.float32)
    data[1, 7, 4] = 100.0  # x index 1 (toward the left), y index 7 (anterior), z index 4 (superior)
    data[5, 2, 4] = 50.0
    return data


def test_nifti_is_reoriented_so_storage_order_does_not_matter(tmp_path):
    ras = _volume_with_marker()
    nib.save(nib.Nifti1Image(ras, np.eye(4)), tmp_path / "ras.nii.gz")
    # the same anatomy stored left-right and anterior-posterior flipped (an LPS-like affine)
    lps_affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    lps_affine[:3, 3] = [7.0, 9.0, 0.0]
    nib.save(nib.Nifti1Image(ras[::-1, ::-1, :].copy(), lps_affine), tmp_path / "lps.nii.gz")
    a = read_nifti(tmp_path / "ras.nii.gz", axis="axial", slice_index=4, percentiles=(0, 100))
    b = read_nifti(tmp_path / "lps.nii.gz", axis="axial", slice_index=4, percentiles=(0, 100))
    assert np.array_equal(a.pixels, b.pixels)
    # axial slice: rows run anterior (top) to posterior, columns along x (RAS)
    rows, cols = a.pixels.shape[:2]
    assert (rows, cols) == (10, 8)
    assert a.pixels[10 - 1 - 7, 1, 0] == 255 and a.pixels[10 - 1 - 2, 5, 0] == 128


def test_nifti_axes_and_errors(tmp_path):
    data = _volume_with_marker()
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "v.nii")
    sag = read_nifti(tmp_path / "v.nii", axis="sagittal", slice_index=1, percentiles=(0, 100))
    assert sag.pixels.shape[:2] == (6, 10) and sag.pixels[6 - 1 - 4, 7, 0] == 255  # superior at the top
    with pytest.raises(MedicalImageError, match="slice 6 requested along axis 2 of 6 slices"):
        read_nifti(tmp_path / "v.nii", slice_index=6)
    data[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "nan.nii")
    with pytest.raises(MedicalImageError, match=r"nan\.nii: the volume contains 1 NaN"):
        read_nifti(tmp_path / "nan.nii")


def test_nibabel_sample_volume_reads():
    from nibabel.testing import data_path

    path = Path(data_path) / "example4d.nii.gz"
    image = read_medical_image(path, volume=1)
    assert image.pixels.dtype == np.uint8 and image.meta["orientation"] == "RAS"
    assert image.pixels.max() == 255 and image.pixels.min() == 0
    # the pixels are the middle axial slice of volume 1 (not volume 0), scaled between the 0.5 and
    # 99.5 percentiles of that volume
    assert not np.array_equal(image.pixels, read_medical_image(path, volume=0).pixels)
    data = np.asarray(nib.as_closest_canonical(nib.load(path)).dataobj, dtype=np.float64)
    assert data.ndim == 4 and not np.array_equal(data[..., 0], data[..., 1])
    vol = data[..., 1]
    lo, hi = np.percentile(vol, (0.5, 99.5))
    assert image.meta["intensity_range"] == pytest.approx([lo, hi])
    plane = vol[:, :, vol.shape[2] // 2].T[::-1, :]  # rows from anterior (top) to posterior
    expected = np.round(np.clip((plane - lo) / (hi - lo), 0, 1) * 255)
    assert image.pixels.shape == (*plane.shape, 3)
    assert np.abs(image.pixels[..., 0].astype(int) - expected).max() <= 1


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    ramp = np.tile(np.linspace(0, 4095, 64).astype(np.uint16), (8, 1))  # 12-bit data in a 16-bit PNG
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    image = read_medical_image(tmp_path / "ramp.png")
    row = image.pixels[0, :, 0].astype(int)
    assert row[0] == 0 and row[-1] == 255 and np.all(np.diff(row) >= 0)
    assert len(np.unique(row)) > 60  # the ramp keeps its levels; clipping at 255 would flatten it
    assert image.meta["bit_depth"] == 16


def test_palette_png_gives_colours_not_palette_indices(tmp_path):
    rgb = np.zeros((4, 6, 3), dtype=np.uint8)
    rgb[:, :3] = (200, 30, 30)
    rgb[:, 3:] = (10, 220, 90)
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=2).save(tmp_path / "pal.png")
    image = read_medical_image(tmp_path / "pal.png")
    assert image.meta["source_mode"] == "P" and image.meta["bit_depth"] == 8
    assert np.array_equal(image.pixels, rgb)


def test_nilearn_mni_template_orientation_is_storage_independent(tmp_path):
    """A real brain volume stored in a flipped (LPS) voxel order reads to the same pixels, and the
    sagittal view has superior at the top."""
    import nilearn

    path = Path(nilearn.__file__).parent / "datasets" / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    img = nib.load(path)
    flipped = nib.as_closest_canonical(img).as_reoriented(nib.orientations.axcodes2ornt(("L", "P", "S")))
    nib.save(flipped, tmp_path / "lps.nii.gz")
    for axis in ("axial", "coronal", "sagittal"):
        a = read_nifti(path, axis=axis)
        b = read_nifti(tmp_path / "lps.nii.gz", axis=axis)
        assert np.array_equal(a.pixels, b.pixels), axis
    # sagittal slice of the RAS volume: rows run superior -> inferior, columns posterior -> anterior
    data = np.asarray(img.dataobj, dtype=float)[98]  # [y, z]
    sag = read_nifti(path, axis="sagittal", slice_index=98).pixels[..., 0].astype(float)
    expected = np.flipud(data.T)
    assert sag.shape == expected.shape
    assert np.corrcoef(sag.ravel(), expected.ravel())[0, 1] > 0.98
    assert np.corrcoef(sag.ravel(), data.T.ravel())[0, 1] < 0.7  # upside down matches far worse


def test_scikit_image_histology_and_fundus_photographs_read_exactly():
    import skimage

    data_dir = Path(skimage.__file__).parent / "data"
    for name in ("ihc.png", "retina.jpg"):
        ours = read_medical_image(data_dir / name)
        with Image.open(data_dir / name) as im:
            ref = np.array(im.convert("RGB"))
        assert ours.pixels.shape == ref.shape and np.array_equal(ours.pixels, ref), name
    # the IHC stain is brown-dominant, the fundus red-dominant: channels are in RGB order
    ihc = read_medical_image(data_dir / "ihc.png").pixels.reshape(-1, 3).mean(0)
    fundus = read_medical_image(data_dir / "retina.jpg").pixels.reshape(-1, 3).mean(0)
    assert fundus[0] > fundus[1] > fundus[2] and ihc[0] > ihc[2]


def test_pipeline_inputs_honour_the_dicom_and_nifti_options():
    from nibabel.testing import data_path

    from unimedvl.inference import ImageReadOptions, load_image

    ct = get_testdata_file("CT_small.dcm")
    lung = np.array(load_image(ct, ImageReadOptions(window="lung")))
    assert np.array_equal(lung, read_dicom(ct, window="lung").pixels)
    assert not np.array_equal(lung, np.array(load_image(ct, ImageReadOptions(window="bone"))))
    vol = Path(data_path) / "anatomical.nii"
    s3 = np.array(load_image(vol, ImageReadOptions(axis="coronal", slice_index=3)))
    assert np.array_equal(s3, read_nifti(vol, axis="coronal", slice_index=3).pixels)
    with pytest.raises(MedicalImageError, match="apply to NIfTI volumes only"):
        load_image(ct, ImageReadOptions(slice_index=3))
    with pytest.raises(MedicalImageError, match="must be uint8"):
        load_image(np.zeros((4, 4), dtype=np.uint16))
