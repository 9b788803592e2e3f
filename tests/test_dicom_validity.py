"""Every kind of DICOM we write is valid DICOM: dicom3tools' ``dciodvfy`` reports no error and no
warning for it, and pydicom reads back the pixels we wrote.

Kinds: the Secondary Capture writer on greyscale (one channel, or three equal ones) and colour
images, from a text-to-image and an image-to-image record, odd sizes included; and the files the
pipeline itself saves for a generated and an edited image (the edit from a real DICOM input).
"""

import json
import shutil
import subprocess

import numpy as np
import pydicom
import pytest
from PIL import Image

from unimedvl.formats.generated import generation_record, save_dicom_secondary_capture

DCIODVFY = shutil.which("dciodvfy")
needs_dciodvfy = pytest.mark.skipif(
    DCIODVFY is None,
    reason="dciodvfy (Debian package dicom3tools) is not installed here; .ci/run installs it, so CI runs this check",
)


def dciodvfy_findings(path) -> tuple[int, list[str]]:
    """dciodvfy's exit status (1 when it found errors, 0 otherwise - warnings do not change it) and
    the lines of its report (written to stderr) that are errors or warnings."""
    r = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    report = (r.stderr + r.stdout).splitlines()
    return r.returncode, [line for line in report if "Error" in line or "Warning" in line]


def assert_valid(path):
    rc, findings = dciodvfy_findings(path)
    assert findings == [], "dciodvfy:\n" + "\n".join(findings)
    assert rc == 0


def check_common(ds, record):
    """The synthetic marking and de-identification attributes every file carries."""
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" == ds.file_meta.MediaStorageSOPClassUID
    assert ds.ConversionType == "SYN" and list(ds.ImageType) == ["DERIVED", "SECONDARY"]
    assert ds.BurnedInAnnotation == "NO" and ds.Modality == "OT"
    assert ds.PatientName.family_name == "SYNTHETIC" and ds.PatientID == "SYNTHETIC"
    assert ds.PatientIdentityRemoved == "YES" and ds.DeidentificationMethod
    (code,) = ds.DeidentificationMethodCodeSequence
    assert (code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning) == ("113100", "DCM", "Basic Application Confidentiality Profile")
    assert ds.StudyID and ds.PatientBirthDate == "" and ds.PatientSex == "" and ds.AccessionNumber == ""
    assert "Synthetic image" in ds.DerivationDescription
    assert json.loads(ds.ImageComments) == record


rng = np.random.default_rng(0)
GREY = rng.integers(0, 256, (48, 80), dtype=np.uint8)
COLOUR = rng.integers(0, 256, (33, 47, 3), dtype=np.uint8)  # odd sizes: an odd number of pixel bytes
CASES = {
    "grey-L-text-to-image": (Image.fromarray(GREY), "text-to-image", GREY),
    "grey-as-RGB-image-to-image": (Image.fromarray(GREY).convert("RGB"), "image-to-image", GREY),
    "grey-odd-size": (Image.fromarray(GREY[:33, :47]), "text-to-image", GREY[:33, :47]),
    "colour-text-to-image": (Image.fromarray(COLOUR), "text-to-image", COLOUR),
    "colour-image-to-image": (Image.fromarray(COLOUR), "image-to-image", COLOUR),
}


@needs_dciodvfy
@pytest.mark.parametrize("case", sorted(CASES))
def test_secondary_capture_passes_dciodvfy_and_reads_back(case, tmp_path):
    image, task, want = CASES[case]
    extra = {"input_images": 1, "conditioning_text": "Denoise.\nAnalysis: \u00e9dema \\ none"} if task == "image-to-image" else {}
    record = generation_record(model="fixture", task=task, prompt="Axial T2 brain MRI \u2014 normal", seed=3, **extra)
    path = save_dicom_secondary_capture(image, tmp_path / f"{case}.dcm", record)
    assert_valid(path)
    ds = pydicom.dcmread(path)
    check_common(ds, record)
    assert ds.PhotometricInterpretation == ("RGB" if want.ndim == 3 else "MONOCHROME2")
    assert ds.pixel_array.dtype == np.uint8 and np.array_equal(ds.pixel_array, want)
    if task == "image-to-image":
        assert "Edited" in ds.DerivationDescription


@needs_dciodvfy
def test_pipeline_generated_and_edited_dicoms_pass_dciodvfy(pipe, tmp_path):
    from pydicom.data import get_testdata_file

    generated = pipe.generate_image("A chest X-ray of a healthy adult.", height=32, width=48, steps=2, seed=1)
    source = get_testdata_file("CT_small.dcm")
    edited = pipe.edit([source], "Denoise this CT slice.", steps=2, analyze=False, height=32, width=32, seed=1)
    source_ds = pydicom.dcmread(source, stop_before_pixels=True)
    for name, result in (("generated", generated), ("edited", edited)):
        path = result.save(tmp_path / f"{name}.dcm")
        assert_valid(path)
        ds = pydicom.dcmread(path)
        check_common(ds, result.record)
        pixels = np.asarray(result.image)
        want = pixels[..., 0] if ds.SamplesPerPixel == 1 else pixels
        assert np.array_equal(ds.pixel_array, want)
    # the edit keeps nothing that leads back to the source patient or study
    assert str(ds.PatientName) != str(source_ds.PatientName) and ds.PatientID != source_ds.PatientID
    assert ds.StudyInstanceUID != source_ds.StudyInstanceUID and ds.SeriesInstanceUID != source_ds.SeriesInstanceUID
    assert "Edited by the model from 1 input image" in ds.DerivationDescription
