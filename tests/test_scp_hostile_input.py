"""Hostile C-STORE data sets on real loopback associations: deflate bombs, lying syntaxes."""

from __future__ import annotations

import zlib
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom.dsutils import encode
from sqlalchemy import func, select

from dicom_node.config.settings import ScpSettings
from dicom_node.db.models import Event, Instance
from dicom_node.db.session import session_scope
from dicom_node.dev.samples import make_cxr_dataset
from tests.helpers import RawInstance, echo, send_raw_one, split_file, stored_relative_paths

MEGABYTE = 1024 * 1024


def _deflate(data: bytes) -> bytes:
    """A raw deflate stream (RFC 1951, no zlib header), as PS3.5 A.5 encodes a data set."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


def _deflated_raw(padding_bytes: int) -> RawInstance:
    """A small CXR whose Data Set Trailing Padding (FFFC,FFFC) OB holds ``padding_bytes`` zeros.

    The padding comes after Pixel Data, so a reader that stops at Pixel Data never sees it:
    only inflating the whole data set finds the bomb.
    """
    ds = make_cxr_dataset(rows=32, columns=32)
    ds.DataSetTrailingPadding = b"\0" * padding_bytes
    payload = _deflate(encode(ds, False, True))
    return RawInstance(
        str(ds.SOPClassUID), str(ds.SOPInstanceUID), DeflatedExplicitVRLittleEndian, payload
    )


def _nothing_stored(node: Any) -> None:
    root = Path(node.settings.storage.root)
    assert stored_relative_paths(root) == set()
    assert list((root / "tmp").iterdir()) == []
    with session_scope(node.session_factory) as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 0


def _stored_payload(node: Any, sop_instance_uid: str) -> bytes:
    with session_scope(node.session_factory) as session:
        row = session.scalars(
            select(Instance).where(Instance.sop_instance_uid == sop_instance_uid)
        ).one()
        path = Path(node.settings.storage.root) / row.path
    return split_file(path, "1.2.3").payload


def test_deflate_bomb_over_max_inflated_mb_answers_a700_and_stores_nothing(
    node_factory: Any,
) -> None:
    node = node_factory(scp=ScpSettings(max_inflated_mb=8))
    bomb = _deflated_raw(64 * MEGABYTE)  # about 64 kB on the wire, 64 MB inflated
    assert len(bomb.payload) < MEGABYTE
    assert send_raw_one(node.scp_port, bomb) == 0xA700
    _nothing_stored(node)
    with session_scope(node.session_factory) as session:
        assert (
            session.scalar(
                select(func.count()).select_from(Event).where(Event.name == "instance.discarded")
            )
            == 0
        )
    assert echo(node.scp_port) == 0


def test_deflated_instance_under_max_inflated_mb_is_stored_as_received(node_factory: Any) -> None:
    node = node_factory(scp=ScpSettings(max_inflated_mb=8))
    legitimate = _deflated_raw(2 * MEGABYTE)
    assert send_raw_one(node.scp_port, legitimate) == 0x0000
    assert _stored_payload(node, legitimate.sop_instance_uid) == legitimate.payload


def test_deflated_instance_written_by_pydicom_is_stored(node: Any) -> None:
    ds = make_cxr_dataset(rows=64, columns=64)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    buffer = BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    path = Path(node.settings.storage.root).parent / "deflated.dcm"
    path.write_bytes(buffer.getvalue())
    raw = split_file(path, str(ds.SOPClassUID))
    assert raw.transfer_syntax_uid == DeflatedExplicitVRLittleEndian
    assert send_raw_one(node.scp_port, raw) == 0x0000
    assert _stored_payload(node, raw.sop_instance_uid) == raw.payload


def test_truncated_deflate_stream_answers_c000_and_stores_nothing(node: Any) -> None:
    whole = _deflated_raw(MEGABYTE)
    truncated = RawInstance(
        whole.sop_class_uid,
        whole.sop_instance_uid,
        whole.transfer_syntax_uid,
        whole.payload[: len(whole.payload) // 2],
    )
    assert send_raw_one(node.scp_port, truncated) == 0xC000
    _nothing_stored(node)


def _encoded(implicit: bool) -> tuple[pydicom.Dataset, bytes]:
    ds = make_cxr_dataset(rows=64, columns=64)
    return ds, encode(ds, implicit, True)


def test_explicit_vr_data_set_on_implicit_vr_context_answers_c000_and_stores_nothing(
    node: Any,
) -> None:
    ds, explicit_bytes = _encoded(implicit=False)
    lying = RawInstance(
        str(ds.SOPClassUID), str(ds.SOPInstanceUID), ImplicitVRLittleEndian, explicit_bytes
    )
    assert send_raw_one(node.scp_port, lying) == 0xC000
    _nothing_stored(node)


def test_implicit_vr_data_set_on_explicit_vr_context_answers_c000_and_stores_nothing(
    node: Any,
) -> None:
    ds, implicit_bytes = _encoded(implicit=True)
    lying = RawInstance(
        str(ds.SOPClassUID), str(ds.SOPInstanceUID), ExplicitVRLittleEndian, implicit_bytes
    )
    assert send_raw_one(node.scp_port, lying) == 0xC000
    _nothing_stored(node)


def test_large_explicit_vr_data_set_on_implicit_vr_context_answers_c000(node: Any) -> None:
    """With megabytes of pixels the first element's misread length still fits the stream;
    the walk over the following elements catches it."""
    ds = make_cxr_dataset(rows=1024, columns=1024)
    lying = RawInstance(
        str(ds.SOPClassUID), str(ds.SOPInstanceUID), ImplicitVRLittleEndian, encode(ds, False, True)
    )
    assert send_raw_one(node.scp_port, lying) == 0xC000
    _nothing_stored(node)


def test_each_encoding_on_its_own_context_is_stored(node: Any) -> None:
    for implicit, syntax in ((True, ImplicitVRLittleEndian), (False, ExplicitVRLittleEndian)):
        ds, payload = _encoded(implicit)
        raw = RawInstance(str(ds.SOPClassUID), str(ds.SOPInstanceUID), syntax, payload)
        assert send_raw_one(node.scp_port, raw) == 0x0000
        assert _stored_payload(node, raw.sop_instance_uid) == payload
