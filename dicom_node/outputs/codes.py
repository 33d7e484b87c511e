"""The coded concepts the outputs use: one table per purpose, each code with its source.

Finding codes are SNOMED CT where a verified concept matches the label, else a DICOM (DCM)
concept from PS3.16's chest findings (CID 6102), else a local code in the private scheme
``99DCMNODE`` (PS3.16 section 8: local schemes start with "99") rather than an unverified guess.
Sources, per row: "PS3.16" means pydicom 3.0's ``pydicom/sr/_concepts_dict.py``, which is
generated from PS3.16; "HL7LT" the HL7 Lithuania lung findings value set
(``HL7LT/ig-lt-lung``, ``incidental-finding-lt-lung.fsh``); "MII" the German Medical
Informatics Initiative MedDRA-to-SNOMED concept map (SNOMED International 2025-07-01);
"HPO" the Human Phenotype Ontology's SNOMED cross-reference.
"""

from __future__ import annotations

import hashlib

from highdicom.sr import CodedConcept
from pydicom.sr.coding import Code

LOCAL_SCHEME = "99DCMNODE"

# label (as TorchXRayVision names it) -> (code value, scheme, meaning, source)
FINDINGS: dict[str, tuple[str, str, str, str]] = {
    "Atelectasis": ("46621007", "SCT", "Atelectasis", "MII"),
    "Consolidation": ("95436008", "SCT", "Lung consolidation", "HL7LT"),
    "Infiltration": ("112121", "DCM", "Infiltrate", "PS3.16 CID 6102"),
    "Pneumothorax": ("36118008", "SCT", "Pneumothorax", "PS3.16 CID 6102"),
    "Edema": ("19242006", "SCT", "Pulmonary edema", "PS3.16 CID 3700"),
    "Emphysema": ("87433001", "SCT", "Pulmonary emphysema", "HL7LT"),
    "Fibrosis": ("112674009", "SCT", "Fibrosis", "PS3.16 CID 6335"),
    "Effusion": ("60046008", "SCT", "Pleural effusion", "PS3.16 CID 8134"),
    "Pneumonia": ("233604007", "SCT", "Pneumonia", "HL7 FHIR value sets"),
    "Pleural_Thickening": (
        "PLEURAL_THICK",
        LOCAL_SCHEME,
        "Pleural thickening",
        "local: no verified SNOMED CT or RadLex code",
    ),
    "Cardiomegaly": ("8186001", "SCT", "Cardiomegaly", "HPO"),
    "Nodule": ("27925004", "SCT", "Nodule", "PS3.16 CID 6102"),
    "Mass": ("4147007", "SCT", "Mass", "PS3.16 CID 6102"),
    "Hernia": ("39839004", "SCT", "Diaphragmatic hernia", "HL7LT"),
    "Lung Lesion": ("52988006", "SCT", "Lesion", "PS3.16"),
    "Fracture": ("125605004", "SCT", "Fracture of bone", "MII"),
    "Lung Opacity": ("112001", "DCM", "Opacity", "PS3.16 CID 6102"),
    "Enlarged Cardiomediastinum": (
        "ENLARGED_CMED",
        LOCAL_SCHEME,
        "Enlarged cardiomediastinum",
        "local: no pre-coordinated code found",
    ),
}

# PS3.16 concepts used in the report structure (all in pydicom's generated tables).
FINDING = Code("121071", "DCM", "Finding")
PROBABILITY = Code("122157", "DCM", "Probability")
PRESENT = Code("52101004", "SCT", "Present")
ABSENT = Code("272519000", "SCT", "Absent")  # PS3.16 CID 240, not 2667000
SUMMARY = Code("121111", "DCM", "Summary")
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")  # TID 1500 row 12
IMAGING_MEASUREMENT_REPORT = Code("126000", "DCM", "Imaging Measurement Report")
PLAIN_CHEST_XRAY = Code("399208008", "SCT", "Plain chest X-ray")
NO_UNITS = Code("1", "UCUM", "no units")
SOURCE = Code("260753009", "SCT", "Source")  # TID 1600: an Image Library entry (as highdicom)
# IHE AIR Rev 1.1 (Trial Implementation) 6.5.3.1: the Purpose of Reference of the Contributing
# Equipment item that describes an algorithm.  "99IHE" is IHE's private scheme; the code is
# the supplement's own placeholder, quoted as written (pydicom 3.0's PS3.16 tables hold none).
PROCESSING_ALGORITHM = Code("Newcode1", "99IHE", "Processing Algorithm")
# IHE IOCM rejection note title (PS3.16 CID 7011): withdraws superseded results.
REJECTED_FOR_QUALITY_REASONS = Code("113001", "DCM", "Rejected for Quality Reasons")


def finding_code(label: str) -> CodedConcept:
    """The coded concept for a model label; labels missing from the table (a site model's)
    use a local code.  Code Value is SH, 16 characters at most (PS3.5 6.2): a longer label
    keeps 7 characters and a hash of the whole label, so two labels never share a code."""
    if label in FINDINGS:
        value, scheme, meaning, _ = FINDINGS[label]
        return CodedConcept(value, scheme, meaning)
    value = label.upper().replace(" ", "_")
    if len(value) > 16:
        value = f"{value[:7]}_{hashlib.sha256(label.encode('utf-8')).hexdigest()[:8].upper()}"
    return CodedConcept(value, LOCAL_SCHEME, label)
