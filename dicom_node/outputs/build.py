"""Assemble every output object of one analysis job, under deterministic UIDs, as bytes.

UIDs derive from (``org_uid_root``, the input SOP Instance UIDs, the study revision, the
model's SHA-256, the kind of output), so building the same job again (a retry, a restart)
gives the same UIDs and a PACS keeps one copy; a re-opened study (a new revision) gets new
ones.  This module builds and encodes; ``jobs.records`` writes files and rows.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import pydicom
from pydicom.dataset import Dataset

from dicom_node.config.settings import Settings
from dicom_node.outputs import kos, pm, sc, sr
from dicom_node.results import AlgorithmInfo, Analysis, OutputKind
from dicom_node.uids import derive_uid


@dataclass(frozen=True)
class BuiltOutput:
    """One encoded output object, ready to be written and recorded."""

    kind: OutputKind
    label: str | None  # the finding a per-finding SC or a PM shows
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    data: bytes  # a Part 10 file


@dataclass(frozen=True)
class OutputNaming:
    """The inputs of every UID of one job's outputs."""

    org_uid_root: str
    input_sop_instance_uids: tuple[str, ...]
    study_revision: int
    weights_sha256: str

    def uid(self, kind: str) -> str:
        return derive_uid(
            self.org_uid_root,
            *sorted(self.input_sop_instance_uids),
            f"revision {self.study_revision}",
            self.weights_sha256,
            kind,
        )


def device_uid(settings: Settings) -> str:
    """The node as an SR observer device: stable for its AE title under the UID root."""
    return derive_uid(settings.node.org_uid_root, "device", settings.node.ae_title)


def build_analysis_outputs(
    header: Dataset, analysis: Analysis, settings: Settings, now: datetime
) -> list[BuiltOutput]:
    """The SR, the SC heatmaps and (``[outputs] parametric_maps``) the PMs of an analysed image."""
    naming = OutputNaming(
        settings.node.org_uid_root,
        (analysis.sop_instance_uid,),
        analysis.study_revision,
        analysis.algorithm.weights_sha256,
    )
    identity = _identity(naming, settings)
    outputs = [_encoded(OutputKind.SR, None, sr.build_sr(header, analysis, identity, now))]
    series = naming.uid("series:sc")
    for number, capture in enumerate(sc.plan_captures(analysis, settings.outputs.sc_mode), 1):
        image = sc.build_sc(
            header,
            analysis,
            capture,
            series_instance_uid=series,
            sop_instance_uid=naming.uid(f"sc:{capture.key}"),
            instance_number=number,
            now=now,
        )
        outputs.append(_encoded(OutputKind.SC, capture.key if capture.findings else None, image))
    if settings.outputs.parametric_maps:
        outputs.extend(_parametric_maps(header, analysis, naming, settings, now))
    return outputs


def _parametric_maps(
    header: Dataset, analysis: Analysis, naming: OutputNaming, settings: Settings, now: datetime
) -> list[BuiltOutput]:
    """One Parametric Map per positive finding, in one series and one frame of reference."""
    maps = []
    for number, finding in enumerate(pm.plan_maps(analysis), 1):
        identity = pm.MapIdentity(
            series_instance_uid=naming.uid("series:pm"),
            sop_instance_uid=naming.uid(f"pm:{finding.label}"),
            frame_of_reference_uid=naming.uid("frame-of-reference:pm"),
            dimension_organization_uid=naming.uid(f"dimension-organization:pm:{finding.label}"),
            instance_number=number,
            device_serial_number=settings.node.ae_title,
        )
        image = pm.build_pm(
            header, analysis, finding, identity, max_size=settings.outputs.sc_max_size, now=now
        )
        maps.append(_encoded(OutputKind.PM, finding.label, image))
    return maps


def build_not_analysed_outputs(
    headers: Sequence[Dataset],
    reason: str,
    algorithm: AlgorithmInfo,
    study_revision: int,
    settings: Settings,
    now: datetime,
) -> list[BuiltOutput]:
    """The SR of a study that was not analysed, saying why (``[outputs] report_not_analysed``)."""
    naming = OutputNaming(
        settings.node.org_uid_root,
        tuple(str(h.SOPInstanceUID) for h in headers),
        study_revision,
        algorithm.weights_sha256,
    )
    report = sr.build_not_analysed_sr(headers, reason, algorithm, _identity(naming, settings), now)
    return [_encoded(OutputKind.SR, None, report)]


def build_withdrawal(
    rejected: Sequence[Dataset],
    naming_inputs: Sequence[str],
    study_revision: int,
    weights_sha256: str,
    settings: Settings,
) -> BuiltOutput:
    """The IOCM rejection note for ``rejected`` (our superseded outputs' headers)."""
    naming = OutputNaming(
        settings.node.org_uid_root, tuple(naming_inputs), study_revision, weights_sha256
    )
    note = kos.build_rejection_note(
        rejected,
        series_instance_uid=naming.uid("series:kos"),
        sop_instance_uid=naming.uid("kos"),
        device_uid=device_uid(settings),
        node_name=settings.node.ae_title,
    )
    return _encoded(OutputKind.KOS, None, note)


def _identity(naming: OutputNaming, settings: Settings) -> sr.ReportIdentity:
    return sr.ReportIdentity(
        series_instance_uid=naming.uid("series:sr"),
        sop_instance_uid=naming.uid("sr"),
        device_uid=device_uid(settings),
        node_name=settings.node.ae_title,
        uid_root=settings.node.org_uid_root,
    )


def _encoded(kind: OutputKind, label: str | None, dataset: Dataset) -> BuiltOutput:
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, dataset, enforce_file_format=True)
    return BuiltOutput(
        kind,
        label,
        str(dataset.SOPClassUID),
        str(dataset.SOPInstanceUID),
        str(dataset.SeriesInstanceUID),
        buffer.getvalue(),
    )
