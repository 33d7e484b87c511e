"""Bounded inflation of Deflated data sets, and the worker's read path on stored files."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import DeflatedExplicitVRLittleEndian
from pynetdicom.dsutils import encode, encode_file_meta

from dicom_node.dev.samples import make_cxr_dataset
from dicom_node.errors import InflationLimitError, InvalidInstanceError
from dicom_node.inference.preprocess import read_dataset
from dicom_node.inflate import (
    DEFAULT_MAX_INFLATED_BYTES,
    MEGABYTE,
    check_stored_inflation,
    inflate_bounded,
)


def _deflate_with_padding(padding_bytes: int) -> tuple[bytes, np.ndarray]:
    """A deflated CXR data set followed by ``padding_bytes`` zeros of (FFFC,FFFC) padding.

    Deflated piece by piece, so building a body that inflates to gigabytes needs no memory.
    """
    ds = make_cxr_dataset(rows=32, columns=32)
    pixels = ds.pixel_array.copy()
    # (FFFC,FFFC) Data Set Trailing Padding, OB, 32-bit length (PS3.5 7.1.2).
    head = encode(ds, False, True) + b"\xfc\xff\xfc\xffOB\0\0" + padding_bytes.to_bytes(4, "little")
    compressor = zlib.compressobj(1, zlib.DEFLATED, -zlib.MAX_WBITS)
    pieces = [compressor.compress(head)]
    zeros = b"\0" * MEGABYTE
    for start in range(0, padding_bytes, MEGABYTE):
        pieces.append(compressor.compress(zeros[: min(MEGABYTE, padding_bytes - start)]))
    pieces.append(compressor.flush())
    return b"".join(pieces), pixels


def _stored_file(path: Path, body: bytes) -> Path:
    """A file as the SCP stores it: preamble, "DICM", File Meta (PS3.10 7.1), data set."""
    ds = make_cxr_dataset(rows=32, columns=32)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    path.write_bytes(b"\0" * 128 + b"DICM" + encode_file_meta(ds.file_meta) + body)
    return path


def test_inflate_bounded_returns_the_data_set_under_the_cap() -> None:
    body, _ = _deflate_with_padding(3 * MEGABYTE)
    inflated = inflate_bounded(body, 4 * MEGABYTE).getvalue()
    assert inflated == zlib.decompress(body, -zlib.MAX_WBITS)


def test_inflate_bounded_stops_at_the_cap() -> None:
    body, _ = _deflate_with_padding(5 * MEGABYTE)
    with pytest.raises(InflationLimitError, match="more than 4 MB"):
        inflate_bounded(body, 4 * MEGABYTE)


def test_inflate_bounded_refuses_truncated_and_garbage_streams() -> None:
    body, _ = _deflate_with_padding(MEGABYTE)
    with pytest.raises(InvalidInstanceError, match="truncated"):
        inflate_bounded(body[: len(body) // 2], 4 * MEGABYTE)
    with pytest.raises(InvalidInstanceError, match="not a valid deflate stream"):
        inflate_bounded(b"\xff" * 64, 4 * MEGABYTE)


def test_worker_refuses_a_stored_deflate_bomb_before_pydicom_inflates_it(tmp_path: Path) -> None:
    # Stored before the SCP had a cap: inflates beyond the default of [scp] max_inflated_mb.
    body, _ = _deflate_with_padding(DEFAULT_MAX_INFLATED_BYTES + MEGABYTE)
    path = _stored_file(tmp_path / "bomb.dcm", body)
    with pytest.raises(InflationLimitError):
        read_dataset(path, max_megapixels=50.0)


def test_worker_reads_a_stored_deflated_image_under_the_cap(tmp_path: Path) -> None:
    body, pixels = _deflate_with_padding(MEGABYTE)
    path = _stored_file(tmp_path / "deflated.dcm", body)
    check_stored_inflation(path, 2 * MEGABYTE)
    ds = read_dataset(path, max_megapixels=50.0)
    assert np.array_equal(ds.pixel_array, pixels)
    with pytest.raises(InflationLimitError):
        check_stored_inflation(path, MEGABYTE // 2)
