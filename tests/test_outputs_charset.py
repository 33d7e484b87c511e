"""Outputs carry the source's names in the source's character set, never a guess at it.

PS3.5 6.1.2.3: without Specific Character Set the repertoire is ISO-IR 6, and bytes outside it
are undefined; they must be copied as they are, not transcoded under a guessed set.
"""

from __future__ import annotations

import io
from datetime import datetime
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.valuerep import PersonName

from dicom_node.config.settings import OutputSettings, Settings
from dicom_node.dev.samples import make_cxr_dataset
from dicom_node.outputs.build import build_analysis_outputs, build_withdrawal
from dicom_node.outputs.charset import fit_text
from dicom_node.outputs.source import source_header
from tests.test_outputs import (
    _analyse_everything,
    _analysis,
    _outputs,
    _send_as_is,
    dciodvfy_errors,
)

CYRILLIC = "Ємельянова^Ірина"
TEXT_VRS = {"SH", "LO", "ST", "LT", "UT", "UC"}


def _source_file(path: Path, character_set: Any, patient_name: str | bytes) -> Path:
    source = make_cxr_dataset(modality="CR", rows=256, columns=256, sop_instance_uid="1.2.3.4.5")
    source.PatientOrientation = ["L", "F"]
    if character_set is not None:
        source.SpecificCharacterSet = character_set
    source.PatientName = (
        PersonName(patient_name) if isinstance(patient_name, bytes) else patient_name
    )
    source.save_as(path, enforce_file_format=True)
    return path


def _raw_value(file: Path | bytes, keyword: str) -> bytes:
    """The element's bytes as they are in the file (read afresh, before any decoding)."""
    ds = pydicom.dcmread(io.BytesIO(file) if isinstance(file, bytes) else file)
    return bytes(ds.get_item(keyword).value)


def _non_ascii_texts(ds: Dataset, skip: tuple[str, ...] = ("PatientName",)) -> list[str]:
    """Text values outside ASCII, other than ``skip`` at the top level, anywhere in ``ds``."""
    found = []
    for element in ds:
        if element.keyword in skip:
            continue
        if element.VR == "SQ":
            for item in element.value:
                found.extend(_non_ascii_texts(item, ()))
        elif element.VR in TEXT_VRS and not str(element.value).isascii():
            found.append(f"{element.keyword}={element.value}")
    return found


def test_a_source_without_character_set_keeps_its_8_bit_name_bytes_and_declares_none(
    node: Any, tmp_path: Path
) -> None:
    raw = CYRILLIC.encode("iso8859_5")
    path = _source_file(tmp_path / "source.dcm", None, raw)
    assert _send_as_is(node.scp_port, path) == 0  # sent as the file's own bytes
    _analyse_everything(node)
    root = Path(node.settings.storage.root)
    written = {o.kind: root / o.path for o in _outputs(node)}
    assert {"sr", "sc"} <= set(written)
    source_errors = dciodvfy_errors(path)
    # dciodvfy names the non-repertoire bytes in the source; ours repeat it, no more.
    assert any("Patient's Name" in line for line in source_errors)
    for kind in ("sr", "sc"):
        ours = pydicom.dcmread(written[kind])
        assert "SpecificCharacterSet" not in ours, kind
        assert _raw_value(written[kind], "PatientName") == raw, kind
        assert not _non_ascii_texts(ours), kind  # our own text stays in ISO-IR 6
        assert dciodvfy_errors(written[kind]) - source_errors == set(), kind


@pytest.mark.parametrize(
    ("character_set", "patient_name"),
    [
        ("ISO_IR 100", "Müller^Jürgen"),
        ("ISO_IR 144", CYRILLIC),
        ("ISO_IR 192", CYRILLIC),
        (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎=やまだ^たろう"),  # PS3.5 H.3.1
    ],
)
def test_a_declared_character_set_is_declared_again_and_the_names_decode_equal(
    tmp_path: Path, character_set: Any, patient_name: str
) -> None:
    path = _source_file(tmp_path / "source.dcm", character_set, patient_name)
    source = pydicom.dcmread(path)
    header = source_header(pydicom.dcmread(path, stop_before_pixels=True)).dataset
    settings = Settings(outputs=OutputSettings(parametric_maps=True))
    outputs = build_analysis_outputs(header, _analysis(), settings, datetime.now())
    headers = [pydicom.dcmread(io.BytesIO(o.data)) for o in outputs]
    note = build_withdrawal(headers, ["1.2.3.4.5"], 2, "ab" * 32, settings)
    assert {o.kind for o in outputs} | {note.kind} == {"sr", "sc", "pm", "kos"}
    source_errors = dciodvfy_errors(path)
    for number, output in enumerate([*outputs, note]):
        ours = pydicom.dcmread(io.BytesIO(output.data))
        assert ours.SpecificCharacterSet == source.SpecificCharacterSet, output.kind
        assert str(ours.PatientName) == str(source.PatientName) == patient_name, output.kind
        assert _raw_value(output.data, "PatientName") == _raw_value(path, "PatientName"), (
            output.kind
        )
        file = tmp_path / f"{number}-{output.kind}.dcm"
        file.write_bytes(output.data)
        assert dciodvfy_errors(file) - source_errors == set(), output.kind


def test_an_ascii_source_without_character_set_gets_utf8_outputs_with_the_same_bytes(
    tmp_path: Path,
) -> None:
    # ISO-IR 6 is a subset of UTF-8: declaring ISO_IR 192 changes no copied byte and lets
    # our own text keep its en dash.
    path = _source_file(tmp_path / "source.dcm", None, "DOE^JANE")
    header = source_header(pydicom.dcmread(path, stop_before_pixels=True)).dataset
    for output in build_analysis_outputs(header, _analysis(), Settings(), datetime.now()):
        ours = pydicom.dcmread(io.BytesIO(output.data))
        assert ours.SpecificCharacterSet == "ISO_IR 192", output.kind
        assert _raw_value(output.data, "PatientName") == b"DOE^JANE", output.kind
    sc = next(
        o
        for o in build_analysis_outputs(header, _analysis(), Settings(), datetime.now())
        if o.kind == "sc"
    )
    derivation = pydicom.dcmread(io.BytesIO(sc.data)).DerivationDescription
    assert "AI result – decision support" in derivation


def test_our_own_text_is_fitted_to_a_declared_single_byte_set(tmp_path: Path) -> None:
    path = _source_file(tmp_path / "source.dcm", "ISO_IR 144", CYRILLIC)
    header = source_header(pydicom.dcmread(path, stop_before_pixels=True)).dataset
    sc = next(
        o
        for o in build_analysis_outputs(header, _analysis(), Settings(), datetime.now())
        if o.kind == "sc"
    )
    ours = pydicom.dcmread(io.BytesIO(sc.data))
    assert ours.DerivationDescription.startswith("AI result - decision support")
    assert fit_text("Ödem – 5 µm…", "ISO_IR 100") == "Ödem - 5 µm..."
    assert fit_text("Ödem – 5 µm…", None) == "Odem - 5 ?m..."
    assert fit_text("Ödem – 5 µm…", "ISO_IR 192") == "Ödem – 5 µm…"
    assert fit_text("Ödem", ["", "ISO 2022 IR 87"]) == "Odem"
