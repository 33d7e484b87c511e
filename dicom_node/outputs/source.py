"""The patient and study attributes an output copies from its source, checked before copying.

Outputs join the study in PACS, so they carry the source's Patient and General Study module
values (PS3.3 C.7.1.1, C.7.2.1).  A value that breaks its VR in the source (an anonymiser's
hash as a Study Date, a two-character Patient's Age) is not copied: it is left empty and named
in the returned list, so the defect is reported once instead of multiplied into every output.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom import config as pydicom_config
from pydicom.dataset import Dataset
from pydicom.valuerep import DA, DT, TM, validate_value

from dicom_node.outputs.charset import output_character_set

# keyword -> (VR, required as Type 2: present even when empty) in the copied modules
COPIED: dict[str, tuple[str, bool]] = {
    "PatientName": ("PN", True),
    "PatientID": ("LO", True),
    "IssuerOfPatientID": ("LO", False),
    "PatientBirthDate": ("DA", True),
    "PatientSex": ("CS", True),
    "PatientAge": ("AS", False),
    "StudyDate": ("DA", True),
    "StudyTime": ("TM", True),
    "StudyID": ("SH", True),
    "AccessionNumber": ("SH", True),
    "ReferringPhysicianName": ("PN", True),
    "StudyDescription": ("LO", False),
}
IDENTIFYING = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
# Image Pixel description (PS3.3 C.7.6.3): highdicom checks a referenced image has it.
PIXEL_DESCRIPTION = (
    "Rows",
    "Columns",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "PatientOrientation",
)
# Pixel spacing (PS3.3 10.7.1.3): the Parametric Map's Pixel Measures scale it to its grid.
SPACING = ("PixelSpacing", "ImagerPixelSpacing")
PATIENT_SEX = ("M", "F", "O")  # PS3.3 C.7.1.1: the enumerated values
_DATE_TIME = {"DA": DA, "TM": TM, "DT": DT}


@dataclass(frozen=True)
class SourceHeader:
    """A clean copy of the source's identifying attributes, and what was left out."""

    dataset: Dataset
    dropped: tuple[str, ...]


def source_header(source: Dataset) -> SourceHeader:
    """Copy the attributes outputs inherit, leaving out values that break their VR."""
    header = Dataset()
    for keyword in IDENTIFYING:
        setattr(header, keyword, source.get(keyword))
    for keyword in PIXEL_DESCRIPTION + SPACING:
        if keyword in source:
            setattr(header, keyword, source.get(keyword))
    header.Modality = str(source.get("Modality") or "OT")
    dropped = []
    for keyword, (vr, type2) in COPIED.items():
        value = source.get(keyword)
        if value in (None, ""):
            if type2:
                setattr(header, keyword, None)
            continue
        if not _valid(keyword, vr, value):
            dropped.append(keyword)
            if type2:
                setattr(header, keyword, None)
            continue
        setattr(header, keyword, value)
    # What every output declares (see outputs.charset): the source's own value, or none
    # when the source declares none and holds bytes outside the default repertoire.
    character_set = output_character_set(
        source.get("SpecificCharacterSet"), (header.get(keyword) for keyword in COPIED)
    )
    if character_set is not None:
        header.SpecificCharacterSet = character_set
    return SourceHeader(header, tuple(dropped))


def _valid(keyword: str, vr: str, value: object) -> bool:
    if keyword == "PatientSex":
        return str(value) in PATIENT_SEX
    try:
        validate_value(vr, value, pydicom_config.RAISE)
        if vr in _DATE_TIME:  # the pattern allows ranges and 31 February; a value must parse
            if "-" in str(value) or _DATE_TIME[vr](str(value)) is None:
                return False
    except (ValueError, TypeError):
        return False
    return True


def clip_text(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` bytes of UTF-8 (a VR's length counts bytes)."""
    encoded = text.encode("utf-8")
    if len(encoded) <= limit:
        return text
    return encoded[:limit].decode("utf-8", errors="ignore").rstrip()
