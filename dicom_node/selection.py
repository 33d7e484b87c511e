"""Input gating: decide which image of a study is analysed, or why none is.

Works from the database rows recorded at receipt (no file is opened).  An image qualifies when
it is a frontal chest radiograph: Modality CR or DX (also inside Secondary Capture), a
presentation image (not DX "for processing"), BodyPartExamined CHEST or empty, ViewPosition
PA or AP (or absent, when ``analyse_missing_view`` is on).  The models were trained on adults,
so patients under ``min_patient_age`` are not analysed.

Choice rule, documented for users: prefer PA, then AP, then an image without a recorded view;
among equals, the latest received.  Raises :class:`UnsupportedStudyError` with a reason that
starts "not analysed:" when nothing qualifies.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date

from dicom_node.clock import as_utc
from dicom_node.config.settings import AnalysisSettings
from dicom_node.db.models import Instance, Study
from dicom_node.errors import UnsupportedStudyError

FRONTAL_VIEWS = ("PA", "AP")
LATERAL_VIEWS = ("LL", "RL", "LATERAL", "LAT", "LLD", "RLD")
CHEST_MODALITIES = ("CR", "DX")
# Words in a study or series description that name another anatomy; consulted only when
# BodyPartExamined is empty (many CR/DX files leave it empty).
NON_CHEST_WORDS = (
    "TEETH",
    "DENTAL",
    "TOOTH",
    "HAND",
    "WRIST",
    "FINGER",
    "FOOT",
    "ANKLE",
    "KNEE",
    "HIP",
    "PELVIS",
    "SPINE",
    "SKULL",
    "ELBOW",
    "SHOULDER",
    "FEMUR",
    "TIBIA",
    "ABDOMEN",
    "MAMMO",
    "BREAST",
)
# An adult chest needs a field of at least this many millimetres on its shorter side
# (chest detectors and cassettes are 35 x 43 cm or 43 x 43 cm).
MIN_CHEST_FIELD_MM = 250.0
DX_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"
_VIEW_RANK = {"PA": 0, "AP": 1, None: 2}


@dataclass(frozen=True)
class Selection:
    """The image to analyse and what the result must say about it."""

    sop_instance_uid: str
    path: str
    notes: tuple[str, ...]  # e.g. "view not recorded"


def select_image(
    study: Study,
    instances: list[Instance],
    settings: AnalysisSettings,
    series_descriptions: dict[str, str | None] | None = None,
) -> Selection:
    """Pick the one image of ``study`` to analyse.

    Raises
    ------
    UnsupportedStudyError
        With the reason ("not analysed: lateral view", "not analysed: patient under 18", ...).
    """
    age = patient_age_years(study)
    if age is not None and age < settings.min_patient_age:
        raise UnsupportedStudyError(f"not analysed: patient under {settings.min_patient_age}")
    reasons: list[str] = []
    eligible: list[Instance] = []
    for instance in instances:
        descriptions = (
            study.study_description,
            (series_descriptions or {}).get(instance.series_instance_uid),
        )
        reason = _reason_not_eligible(instance, settings) or _reason_not_chest(
            instance, descriptions
        )
        if reason is None:
            eligible.append(instance)
        elif reason not in reasons:
            reasons.append(reason)
    if not eligible:
        raise UnsupportedStudyError("; ".join(reasons) or "not analysed: no image in study")
    chosen = min(
        eligible,
        key=lambda i: (
            _VIEW_RANK[_view(i)],
            -as_utc(i.received_at).timestamp(),
            i.sop_instance_uid,
        ),
    )
    notes: tuple[str, ...] = ("view not recorded",) if _view(chosen) is None else ()
    if age is None:
        notes += ("patient age not recorded",)
    return Selection(chosen.sop_instance_uid, chosen.path, notes)


def _view(instance: Instance) -> str | None:
    view = (instance.view_position or "").strip().upper()
    return view or None


def _reason_not_eligible(instance: Instance, settings: AnalysisSettings) -> str | None:
    modality = (instance.modality or "").strip().upper()
    if modality not in CHEST_MODALITIES:
        return f"not analysed: modality {modality or 'not recorded'} is not CR or DX"
    if instance.sop_class_uid == DX_FOR_PROCESSING:
        return "not analysed: image is for processing only"
    body_part = (instance.body_part_examined or "").strip().upper()
    if body_part not in ("", "CHEST"):
        return f"not analysed: body part {body_part}, not chest"
    view = _view(instance)
    if view in LATERAL_VIEWS:
        return "not analysed: lateral view"
    if view is None and not settings.analyse_missing_view:
        return "not analysed: view not recorded"
    if view is not None and view not in FRONTAL_VIEWS:
        return f"not analysed: view {view} is not PA or AP"
    if (
        instance.rows
        and instance.columns
        and instance.rows * instance.columns > settings.max_megapixels * 1e6
    ):
        return f"not analysed: image larger than {settings.max_megapixels:g} megapixels"
    return None


def _reason_not_chest(instance: Instance, descriptions: tuple[str | None, ...]) -> str | None:
    """Extra evidence for images that do not record their body part."""
    if (instance.body_part_examined or "").strip():
        return None
    text = " ".join(d.upper() for d in descriptions if d)
    for word in NON_CHEST_WORDS:
        if re.search(rf"\b{word}\b", text):
            return f"not analysed: description names {word}, not chest"
    if instance.field_of_view_mm is not None and instance.field_of_view_mm < MIN_CHEST_FIELD_MM:
        return (
            f"not analysed: field of view {instance.field_of_view_mm:g} mm is too small "
            "for an adult chest"
        )
    return None


def patient_age_years(study: Study) -> float | None:
    """Age from PatientAge (PS3.5 AS: nnnD/W/M/Y), else from birth date and study date."""
    text = (study.patient_age or "").strip().upper()
    match = re.fullmatch(r"(\d{3})([DWMY])", text)
    if match:
        per_year = {"D": 365.25, "W": 52.18, "M": 12.0, "Y": 1.0}[match.group(2)]
        return int(match.group(1)) / per_year
    born, seen = _date(study.patient_birth_date), _date(study.study_date)
    if born and seen and seen >= born:
        return (seen - born).days / 365.25
    return None


def _date(text: str | None) -> date | None:
    if not text or not re.fullmatch(r"\d{8}", text.strip()):
        return None
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:8]))
    except ValueError:
        return None
