"""Build the IHE IOCM rejection note that withdraws superseded results from a PACS.

A Key Object Selection document titled "Rejected for Quality Reasons" (PS3.16 CID 7011,
IHE RAD TF-2 IOCM) referencing every superseded output: a PACS that implements IOCM hides
or deletes them; one that does not simply stores the note.  Builds a data set only.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
from highdicom.sr import DeviceObserverIdentifyingAttributes, ObserverContext
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from dicom_node.errors import OutputBuildError
from dicom_node.outputs.charset import declare, without_character_set
from dicom_node.outputs.codes import REJECTED_FOR_QUALITY_REASONS
from dicom_node.outputs.source import COPIED

SERIES_NUMBER = 9904


def build_rejection_note(
    rejected: Sequence[Dataset],
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    device_uid: str,
    node_name: str,
) -> hd.ko.KeyObjectSelectionDocument:
    """A KOS rejecting ``rejected`` (headers of our own superseded SR and SC objects).

    Raises
    ------
    OutputBuildError
        When highdicom refuses a value.
    """
    try:
        observer = ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
                uid=device_uid, name=node_name[:64], manufacturer_name="dicom-node"
            ),
        )
        content = hd.ko.KeyObjectSelection(
            document_title=REJECTED_FOR_QUALITY_REASONS,
            referenced_objects=list(rejected),
            observer_device_context=observer,
            description="AI results superseded by a newer analysis of this study",
        )
        # Our outputs' character set is the source's, which highdicom's check may refuse
        # (\ISO 2022 IR 87): it is set on the note afterwards.
        note = hd.ko.KeyObjectSelectionDocument(
            evidence=[without_character_set(r) for r in rejected],
            content=content,
            series_instance_uid=series_instance_uid,
            series_number=SERIES_NUMBER,
            sop_instance_uid=sop_instance_uid,
            instance_number=1,
            manufacturer="dicom-node",
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise OutputBuildError(
            f"rejection note could not be built ({type(exc).__name__}); "
            "a source attribute may be invalid"
        ) from None
    note.SeriesDescription = "AI results withdrawn (IOCM rejection note)"
    declare(note, rejected[0].get("SpecificCharacterSet"), COPIED)
    return note
