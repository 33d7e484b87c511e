"""Read the identifying header of a received data set without touching its pixel data.

The C-STORE handler needs the UIDs (to check them against the command and to name the file),
the attributes that route the study (modality, view, body part) and the patient and study
attributes the worklist shows.  Parsing stops before Pixel Data, so no decoding ever happens
on the association thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from io import BytesIO

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag
from pydicom.uid import UID

from dicom_node.encoding import check_negotiated_encoding
from dicom_node.errors import InvalidInstanceError
from dicom_node.inflate import inflate_bounded


@dataclass(frozen=True)
class InstanceHeader:
    """The received instance's identity and routing attributes (values as text)."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    modality: str | None
    view_position: str | None
    body_part_examined: str | None
    image_type: str | None
    rows: int | None
    columns: int | None
    field_of_view_mm: float | None
    series_number: str | None
    series_description: str | None
    patient_name: str | None
    patient_id: str | None
    patient_birth_date: str | None
    patient_sex: str | None
    patient_age: str | None
    accession_number: str | None
    study_date: str | None
    study_time: str | None
    study_description: str | None


_TEXT_ATTRIBUTES = {
    "modality": ("Modality", 16),
    "view_position": ("ViewPosition", 16),
    "body_part_examined": ("BodyPartExamined", 16),
    "series_number": ("SeriesNumber", 12),
    "series_description": ("SeriesDescription", 64),
    "patient_name": ("PatientName", 324),
    "patient_id": ("PatientID", 64),
    "patient_birth_date": ("PatientBirthDate", 8),
    "patient_sex": ("PatientSex", 16),
    "patient_age": ("PatientAge", 4),
    "accession_number": ("AccessionNumber", 16),
    "study_date": ("StudyDate", 8),
    "study_time": ("StudyTime", 16),
    "study_description": ("StudyDescription", 64),
}


def read_header(
    stream: bytes, transfer_syntax_uid: str, *, max_inflated_bytes: int
) -> InstanceHeader:
    """Parse a data set ``stream`` encoded in ``transfer_syntax_uid`` up to Pixel Data.

    A Deflated data set (PS3.5 A.5) is inflated with a hard cap of ``max_inflated_bytes``
    (``[scp] max_inflated_mb``), and the whole of it, so nothing over the cap is ever stored.
    The first elements must be encoded as the negotiated syntax says (PS3.5 7.1): pydicom
    would otherwise read the other VR encoding silently and the File Meta would lie.

    Raises
    ------
    InflationLimitError
        When a Deflated data set inflates beyond the cap (the SCP answers 0xA700).
    TransferSyntaxMismatchError
        When the data set is encoded in another VR encoding than the negotiated one.
    InvalidInstanceError
        When the bytes cannot be parsed or a required UID (SOP Class, SOP Instance, Study,
        Series) is absent.  The message never quotes element values.
    """
    syntax = UID(transfer_syntax_uid)
    try:
        # PS3.5 A.4: every encapsulated (compressed) syntax is explicit VR little endian.
        known = syntax.is_transfer_syntax
        implicit = syntax.is_implicit_VR if known else False
        little = syntax.is_little_endian if known else True
        if known and syntax.is_deflated:  # PS3.5 A.5: the whole data set is deflated
            source = inflate_bounded(stream, max_inflated_bytes)
            with source.getbuffer() as inflated:  # in place: no second copy of the output
                check_negotiated_encoding(
                    inflated,
                    implicit=implicit,
                    little=little,
                    transfer_syntax_uid=transfer_syntax_uid,
                )
        else:
            source = BytesIO(stream)  # shares the bytes
            if known:  # a private syntax's encoding is not ours to judge
                check_negotiated_encoding(
                    stream,
                    implicit=implicit,
                    little=little,
                    transfer_syntax_uid=transfer_syntax_uid,
                )
        dataset = read_dataset(source, implicit, little, stop_when=_at_pixel_data)
        return _header_from(dataset, transfer_syntax_uid)
    except InvalidInstanceError:
        raise
    except Exception as exc:  # pydicom raises many types on hostile input
        raise InvalidInstanceError(f"data set cannot be parsed ({type(exc).__name__})") from None


def _at_pixel_data(tag: BaseTag, vr: str | None, length: int) -> bool:
    return tag in (0x7FE00010, 0x7FE00009, 0x7FE00008)


def _header_from(dataset: Dataset, transfer_syntax_uid: str) -> InstanceHeader:
    uids = {}
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        value = dataset.get(keyword)
        if value is None or str(value) == "":
            raise InvalidInstanceError(f"required attribute {keyword} is missing")
        uids[keyword] = str(value)
    text = {
        name: _text(dataset, keyword, limit) for name, (keyword, limit) in _TEXT_ATTRIBUTES.items()
    }
    image_type = dataset.get("ImageType")
    if image_type is not None and not isinstance(image_type, str):
        image_type = "\\".join(str(v) for v in image_type)
    return InstanceHeader(
        sop_class_uid=uids["SOPClassUID"],
        sop_instance_uid=uids["SOPInstanceUID"],
        study_instance_uid=uids["StudyInstanceUID"],
        series_instance_uid=uids["SeriesInstanceUID"],
        transfer_syntax_uid=transfer_syntax_uid,
        image_type=str(image_type)[:128] if image_type else None,
        rows=_int(dataset.get("Rows")),
        columns=_int(dataset.get("Columns")),
        field_of_view_mm=_field_of_view_mm(dataset),
        **text,
    )


def _field_of_view_mm(dataset: Dataset) -> float | None:
    """The image's shorter physical side at the detector (PS3.3 10.7.1.3), if spacing is known."""
    try:
        spacing = dataset.get("ImagerPixelSpacing") or dataset.get("PixelSpacing")
        rows, columns = int(dataset.Rows), int(dataset.Columns)
        return round(min(rows * float(spacing[0]), columns * float(spacing[1])), 1)
    except (AttributeError, TypeError, ValueError, IndexError):
        return None


def _text(dataset: Dataset, keyword: str, limit: int) -> str | None:
    value = dataset.get(keyword)
    if value is None or str(value) == "":
        return None
    return str(value)[:limit]


def _int(value: object) -> int | None:
    try:
        return int(value) if value is not None else None  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None
