"""Preprocessing matches torchxrayvision's reference path; budgets and colour are refused."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torchxrayvision as xrv
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

from dicom_node.dev.samples import make_cxr_dataset
from dicom_node.errors import UnsupportedStudyError
from dicom_node.inference.preprocess import prepare, read_dataset
from tests.helpers import run_cli

RANGE = 2048.0  # the model input spans [-1024, 1024]


def _reference(path: Path, tmp_path: Path) -> np.ndarray:
    """xrv.utils.read_xray_dcm, then XRayCenterCrop, then XRayResizer(224)."""
    copy = tmp_path / path.name
    read_dataset(path, 50).save_as(copy, enforce_file_format=True)  # ACR-NEMA: add File Meta
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        image = xrv.utils.read_xray_dcm(copy)
    return xrv.datasets.XRayResizer(224)(xrv.datasets.XRayCenterCrop()(image[None]))


def test_model_input_matches_torchxrayvision_reference_on_every_shared_cxr(
    shared_data: Path, tmp_path: Path
) -> None:
    files = sorted((shared_data / "dicom" / "cxr").glob("*.dcm"))
    assert any("MONO1" in f.name for f in files) and any("noFileMeta" in f.name for f in files)
    for path in files:
        reference = _reference(path, tmp_path)
        ours = prepare(path, resolution=224).pixels
        assert ours.shape == reference.shape == (1, 224, 224)
        mad = float(np.abs(ours - reference).mean())
        correlation = float(np.corrcoef(ours.ravel(), reference.ravel())[0, 1])
        assert mad <= 0.01 * RANGE, (path.name, mad)
        assert correlation >= 0.999, (path.name, correlation)


def test_oversized_image_is_refused_before_decoding(tmp_path: Path) -> None:
    ds = make_cxr_dataset(rows=16, columns=16)
    ds.Rows, ds.Columns = 10000, 6000  # claims 60 MP; the pixel data could never decode
    path = tmp_path / "huge.dcm"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(UnsupportedStudyError, match="larger than 50 megapixels"):
        prepare(path, resolution=224)


def test_colour_image_is_not_analysed(tmp_path: Path) -> None:
    ds = make_cxr_dataset(rows=16, columns=16)
    ds.PhotometricInterpretation = "RGB"
    path = tmp_path / "rgb.dcm"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(UnsupportedStudyError, match="RGB is not greyscale"):
        prepare(path, resolution=224)


def test_non_square_geometry_is_recorded_for_mapping_back(tmp_path: Path) -> None:
    path = tmp_path / "wide.dcm"
    make_cxr_dataset(rows=300, columns=500).save_as(path, enforce_file_format=True)
    geometry = prepare(path, resolution=224).geometry
    assert (geometry.crop_top, geometry.crop_left, geometry.crop_size) == (0, 100, 300)


def test_debug_preprocess_writes_the_model_input(shared_data: Path, tmp_path: Path) -> None:
    source = shared_data / "dicom" / "cxr" / "WG04_RG1_J2KI.dcm"
    config = tmp_path / "n.toml"
    config.write_text(f'[storage]\nroot = "{tmp_path}"\n')
    result = run_cli(config, "debug", "preprocess", str(source), "--out", str(tmp_path / "x.npy"))
    assert result.returncode == 0, result.stderr
    assert np.array_equal(np.load(tmp_path / "x.npy"), prepare(source, resolution=224).pixels)


def _with_number_of_frames(tmp_path: Path, value: bytes) -> Path:
    """A 512 x 512 single-frame image whose Number of Frames is written byte for byte."""
    path = tmp_path / "frames.dcm"
    make_cxr_dataset(rows=512, columns=512).save_as(path, enforce_file_format=True)
    ds = pydicom.dcmread(path)
    value += b" " * (len(value) % 2)  # PS3.5 6.2: IS is padded to even length with a space
    ds[0x00280008] = RawDataElement(Tag(0x00280008), "IS", len(value), value, 0, False, True)
    ds.save_as(path)
    return path


def test_signed_number_of_frames_counts_against_the_pixel_budget(tmp_path: Path) -> None:
    # "+10" is a valid IS (PS3.5 6.2): ten 512 x 512 frames are 2.6 megapixels, over 1.
    path = _with_number_of_frames(tmp_path, b"+10")
    with pytest.raises(UnsupportedStudyError, match="larger than 1 megapixels"):
        prepare(path, resolution=224, max_megapixels=1)


def test_number_of_frames_with_surrounding_spaces_is_one_frame(tmp_path: Path) -> None:
    path = _with_number_of_frames(tmp_path, b" 1 ")
    assert prepare(path, resolution=224, max_megapixels=1).pixels.shape == (1, 224, 224)


@pytest.mark.parametrize("value", [b"abc", b"0", b"-1", b"1\\2", b"1.5", b"99999999999"])
def test_number_of_frames_that_is_not_a_positive_integer_is_an_invalid_header(
    tmp_path: Path, value: bytes
) -> None:
    path = _with_number_of_frames(tmp_path, value)
    with pytest.raises(
        UnsupportedStudyError, match="not analysed: invalid header: Number of Frames"
    ):
        prepare(path, resolution=224)
