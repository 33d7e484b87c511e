"""Synthetic chest X-ray data sets for the demo, the tests and the benchmarks.

The images are a drawn phantom (body outline, two lung fields, spine, ribs, noise), not
anatomy, and the patients are fictitious.  They let ``make demo`` run on a fresh machine
without any real data.
"""

from __future__ import annotations

from datetime import datetime

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian, generate_uid

CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_PRESENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"
SAMPLE_UID_ROOT = "1.2.826.0.1.3680043.10.1234.9."


def phantom_pixels(rows: int, columns: int, bits_stored: int = 12, seed: int = 0) -> np.ndarray:
    """A chest-like phantom as unsigned integers using ``bits_stored`` bits."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:columns].astype(np.float32)
    y /= rows
    x /= columns
    image = np.full((rows, columns), 0.08, dtype=np.float32)
    body = ((x - 0.5) / 0.45) ** 2 + ((y - 0.55) / 0.5) ** 2 < 1
    image[body] = 0.55
    for centre in (0.3, 0.7):
        lung = ((x - centre) / 0.16) ** 2 + ((y - 0.45) / 0.3) ** 2 < 1
        image[lung] = 0.25
    image[(np.abs(x - 0.5) < 0.04) & body] = 0.8
    ribs = (np.sin(y * 60) > 0.85) & body
    image[ribs] += 0.12
    image += rng.normal(0, 0.02, size=image.shape).astype(np.float32)
    maximum = (1 << bits_stored) - 1
    return (np.clip(image, 0, 1) * maximum).astype(np.uint16)


def make_cxr_dataset(
    *,
    modality: str = "DX",
    view_position: str | None = "PA",
    rows: int = 512,
    columns: int = 448,
    bits_stored: int = 12,
    patient_name: str = "DEMO^PATIENT",
    patient_id: str = "DEMO-0001",
    accession_number: str = "DEMO0001",
    study_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    seed: int = 0,
) -> Dataset:
    """A complete CR or DX (for presentation) instance with a phantom image."""
    sop_class = CR_STORAGE if modality == "CR" else DX_PRESENTATION_STORAGE
    ds = Dataset()
    ds.file_meta = _file_meta(sop_class, sop_instance_uid or generate_uid(SAMPLE_UID_ROOT))
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_instance_uid or generate_uid(SAMPLE_UID_ROOT)
    ds.SeriesInstanceUID = series_instance_uid or generate_uid(SAMPLE_UID_ROOT)
    now = datetime.now()
    ds.StudyDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.AccessionNumber = accession_number
    ds.Modality = modality
    ds.Manufacturer = "dicom-node sample generator"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "XR CHEST"
    ds.SeriesDescription = f"CHEST {view_position or ''}".strip()
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.PatientAge = "056Y"
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.BodyPartExamined = "CHEST"
    if view_position is not None:
        ds.ViewPosition = view_position
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    _pixel_module(ds, phantom_pixels(rows, columns, bits_stored, seed), bits_stored)
    if modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.PixelIntensityRelationship = "LOG"
        ds.PixelIntensityRelationshipSign = 1
    return ds


def _file_meta(sop_class_uid: str, sop_instance_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class_uid)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return meta


def _pixel_module(ds: Dataset, pixels: np.ndarray, bits_stored: int) -> None:
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.tobytes()
