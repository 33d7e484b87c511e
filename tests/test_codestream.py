"""A compressed frame's own size (JPEG 2000 SIZ, JPEG SOF, JPEG-LS SOF55) is checked against
Rows/Columns and the pixel budget before any decoder sees it."""

from __future__ import annotations

import struct
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_fragments
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless
from sqlalchemy import select

from dicom_node.clock import utcnow
from dicom_node.db.models import Job, Output
from dicom_node.db.session import session_scope
from dicom_node.dev.samples import CR_STORAGE, make_cxr_dataset
from dicom_node.errors import UnsupportedStudyError
from dicom_node.inference.codestream import (
    J2K_SYNTAXES,
    JPEG_LS_SYNTAXES,
    JPEG_SYNTAXES,
    check_frames,
    jpeg2000_size,
    jpeg_size,
)
from dicom_node.inference.models import load_bundle
from dicom_node.inference.preprocess import number_of_frames, prepare
from dicom_node.jobs.worker import Worker
from dicom_node.studies import close_quiet_studies
from tests.helpers import send_raw_one, split_file

MISMATCH = "not analysed: pixel data does not match header"
SIIM = "SIIM_1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"  # JPEG baseline


def _compressed(syntax: str, rows: int = 512, columns: int = 512) -> Dataset:
    ds = make_cxr_dataset(rows=rows, columns=columns)
    ds.compress(syntax)
    return ds


def _frames(ds: Dataset) -> list[bytes]:
    return list(generate_fragments(ds.PixelData))[1:]  # item 0: the Basic Offset Table


def _with_frames(ds: Dataset, frames: list[bytes]) -> Dataset:
    ds.PixelData = encapsulate(frames)
    ds["PixelData"].is_undefined_length = True
    if len(frames) > 1:
        ds.NumberOfFrames = len(frames)
    return ds


def _claim_j2k(frame: bytes, columns: int, rows: int) -> bytes:
    """The frame with SIZ's Xsiz and Ysiz (ISO 15444-1 A.5.1) replaced; the rest unchanged."""
    assert frame[:4] == b"\xff\x4f\xff\x51"
    return frame[:8] + struct.pack(">2L", columns, rows) + frame[16:]


def _claim_sof(frame: bytes, marker: bytes, columns: int, rows: int) -> bytes:
    """The frame with the SOF's Y and X (T.81 B.2.2, T.87 C.2.2) replaced."""
    at = frame.index(marker)
    return frame[: at + 5] + struct.pack(">2H", rows, columns) + frame[at + 9 :]


def _save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def test_jpeg2000_siz_claiming_20000_squared_in_a_512_header_is_refused_before_decoding(
    tmp_path: Path,
) -> None:
    ds = _compressed(JPEG2000Lossless)
    honest = _save(ds, tmp_path / "honest.dcm")
    assert prepare(honest, resolution=224).pixels.shape == (1, 224, 224)  # the control
    (frame,) = _frames(ds)
    hostile = _save(_with_frames(ds, [_claim_j2k(frame, 20000, 20000)]), tmp_path / "h.dcm")
    assert hostile.stat().st_size < 400_000 and (ds.Rows, ds.Columns) == (512, 512)
    # A decode would have to build 400 megapixels and then fail ("cannot be decoded"); the
    # reason names the code stream's size, so the refusal came from reading the SIZ alone.
    with pytest.raises(UnsupportedStudyError) as refused:
        prepare(hostile, resolution=224)
    assert str(refused.value) == (
        f"{MISMATCH} (JPEG 2000 SIZ 20000x20000x1, Rows/Columns/Samples per Pixel 512x512x1)"
    )


def test_jpeg2000_matching_the_header_but_over_the_pixel_budget_gets_the_budget_reason(
    tmp_path: Path,
) -> None:
    path = _save(_compressed(JPEG2000Lossless), tmp_path / "j2k.dcm")
    with pytest.raises(UnsupportedStudyError, match="image larger than 0.2 megapixels"):
        prepare(path, resolution=224, max_megapixels=0.2)


def test_second_frame_of_a_multi_frame_jpeg2000_is_checked_too(tmp_path: Path) -> None:
    ds = _compressed(JPEG2000Lossless)
    (frame,) = _frames(ds)
    path = _save(_with_frames(ds, [frame, _claim_j2k(frame, 4096, 4096)]), tmp_path / "mf.dcm")
    with pytest.raises(UnsupportedStudyError, match=r"JPEG 2000 SIZ 4096x4096x1, Rows"):
        prepare(path, resolution=224)


def test_jpeg_baseline_sof_that_differs_from_rows_and_columns_is_refused(
    shared_data: Path, tmp_path: Path
) -> None:
    ds = pydicom.dcmread(shared_data / "dicom" / "cxr" / SIIM)
    assert jpeg_size(_frames(ds)[0]) is not None
    assert prepare(shared_data / "dicom" / "cxr" / SIIM, resolution=224).pixels.shape[1] == 224
    patched = [_claim_sof(b"".join(_frames(ds)), b"\xff\xc0", 4096, 4096)]
    path = _save(_with_frames(ds, patched), tmp_path / "sof.dcm")
    with pytest.raises(UnsupportedStudyError) as refused:
        prepare(path, resolution=224)
    assert str(refused.value) == (
        f"{MISMATCH} (JPEG SOF0 4096x4096x1, Rows/Columns/Samples per Pixel 1024x1024x1)"
    )


def test_jpeg_ls_sof55_that_differs_from_rows_and_columns_is_refused(tmp_path: Path) -> None:
    ds = _compressed(JPEGLSLossless)
    (frame,) = _frames(ds)
    path = _save(
        _with_frames(ds, [_claim_sof(frame, b"\xff\xf7", 20000, 20000)]), tmp_path / "jls.dcm"
    )
    with pytest.raises(UnsupportedStudyError, match=r"JPEG-LS SOF55 20000x20000x1, Rows"):
        prepare(path, resolution=224)


def test_a_frame_with_no_readable_frame_header_is_refused(tmp_path: Path) -> None:
    ds = _compressed(JPEG2000Lossless)
    path = _save(_with_frames(ds, [b"\x00" * 64]), tmp_path / "junk.dcm")
    with pytest.raises(UnsupportedStudyError, match="no readable frame header"):
        prepare(path, resolution=224)


def test_sizes_are_read_from_raw_and_jp2_wrapped_jpeg2000_and_from_jpeg() -> None:
    image = Image.fromarray(np.arange(48 * 40, dtype=np.uint8).reshape(48, 40))
    for options in ({"no_jp2": True}, {"no_jp2": False}):
        stream = BytesIO()
        image.save(stream, format="JPEG2000", **options)
        size = jpeg2000_size(stream.getvalue())
        assert size is not None and (size.rows, size.columns, size.components) == (48, 40, 1)
        assert (size.precision, size.signed) == (8, False)
    stream = BytesIO()
    image.save(stream, format="JPEG")
    size = jpeg_size(stream.getvalue())
    assert size is not None and (size.rows, size.columns, size.marker) == (48, 40, "JPEG SOF0")


def test_every_decodable_shared_compressed_image_passes_the_check(shared_data: Path) -> None:
    """No false refusals: what pydicom decodes (listing.tsv) declares its header's size."""
    rows = [
        line.split("\t")
        for line in (shared_data / "dicom" / "listing.tsv").read_text().splitlines()[1:]
    ]
    checked = 0
    for row in rows:
        syntax, decoded = row[5], row[-1]
        if syntax not in J2K_SYNTAXES | JPEG_SYNTAXES | JPEG_LS_SYNTAXES or not decoded.startswith(
            "ok"
        ):
            continue
        ds = pydicom.dcmread(shared_data / "dicom" / row[0], force=True)
        check_frames(ds, number_of_frames(ds))
        checked += 1
    assert checked >= 20


def _analyse_everything(node: Any) -> None:
    close_quiet_studies(node.session_factory, quiet_seconds=0, max_attempts=3, now=utcnow())
    worker = Worker(node.settings, node.session_factory, load_bundle(node.settings))
    while worker.run_once():
        pass


def test_received_jpeg2000_with_an_oversized_siz_ends_not_analysed_with_its_sr(
    node: Any, tmp_path: Path
) -> None:
    ds = _compressed(JPEG2000Lossless)
    (frame,) = _frames(ds)
    hostile = _save(_with_frames(ds, [_claim_j2k(frame, 20000, 20000)]), tmp_path / "h.dcm")
    assert send_raw_one(node.scp_port, split_file(hostile, CR_STORAGE)) == 0  # as it is
    _analyse_everything(node)
    with session_scope(node.session_factory) as session:
        (job,) = session.scalars(select(Job).where(Job.kind == "analysis")).all()
        assert job.state == "skipped"
        assert job.reason is not None and job.reason.startswith(MISMATCH)
        assert "20000x20000" in job.reason
        kinds = session.scalars(select(Output.kind)).all()
    assert kinds == ["sr"]  # the "not analysed" report ([outputs] report_not_analysed)
