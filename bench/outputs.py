"""Outputs benchmark: building the SR and SCs of a study, and the time until the PACS has them.

(a) per study: building and encoding the SR and the SC heatmaps (composite, and one per
    positive finding), beside the classification of that study (forward, CAMs, boxes) in the
    same run; target: outputs at most 1 s per study on CPU.  The image is a 2500 x 2048 12-bit
    phantom CR; the network is an untrained DenseNet-121, which calls many findings positive,
    so the SR and the per-finding SCs are near their largest.
(b) latency: from the node acknowledging the last (only) instance of a study to Orthanc
    (Debian's Orthanc, started here on 127.0.0.1) holding its SR, with
    ``study_quiet_seconds = 2``; target: at most the quiet time plus 3 s on CPU.
Usage:
    python bench/outputs.py [--studies 10] [--latency-studies 5]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import pydicom

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dicom_node.config.settings import (  # noqa: E402
    ModelSettings,
    NodeSettings,
    OutputSettings,
    PeerSettings,
    SchedulerSettings,
    Settings,
    StorageSettings,
)
from dicom_node.dev.samples import make_cxr_dataset  # noqa: E402
from dicom_node.inference.models import load_bundle  # noqa: E402
from dicom_node.jobs.analysis import analysis_of, classify_jobs, prepare_job  # noqa: E402
from dicom_node.jobs.queue import Lease  # noqa: E402
from dicom_node.logs import configure_logging  # noqa: E402
from dicom_node.outputs.build import build_analysis_outputs  # noqa: E402
from dicom_node.outputs.source import source_header  # noqa: E402
from dicom_node.selection import Selection  # noqa: E402

QUIET = 2.0


def _settings(root: Path, **sections: object) -> Settings:
    base = Settings(
        storage=StorageSettings(root=str(root), min_free_mb=10),
        model=ModelSettings(models_dir=str(root / "models"), allow_untrained=True, batch_size=1),
        node=NodeSettings(host="127.0.0.1", port=0),
    )
    return dataclasses.replace(base, **sections)


def build_times(studies: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        settings = _settings(root)
        bundle = load_bundle(settings)
        rows = {"classify": [], "composite": [], "per_finding": []}
        sizes = []
        for seed in range(studies):
            ds = make_cxr_dataset(modality="CR", rows=2500, columns=2048, seed=seed)
            path = root / f"{seed}.dcm"
            ds.save_as(path, enforce_file_format=True)
            lease = Lease(seed, "analysis", ds.StudyInstanceUID, 1, "", 1, 3, "t")
            selection = Selection(ds.SOPInstanceUID, f"{seed}.dcm", ())
            prepared = prepare_job(lease, selection, settings, bundle.card.resolution)
            start = time.perf_counter()
            (result,) = classify_jobs(bundle, [prepared], settings.analysis.box_threshold)
            rows["classify"].append(time.perf_counter() - start)
            header = source_header(pydicom.dcmread(path, stop_before_pixels=True)).dataset
            analysis = analysis_of(result, bundle)
            for mode in ("composite", "per_finding"):
                mode_settings = dataclasses.replace(settings, outputs=OutputSettings(sc_mode=mode))
                start = time.perf_counter()
                built = build_analysis_outputs(header, analysis, mode_settings, datetime.now(UTC))
                rows[mode].append(time.perf_counter() - start)
                if mode == "per_finding":
                    sizes.append(
                        (sum(f.positive for f in result.findings), len(built), len(built[0].data))
                    )
        print(f"(a) {studies} studies, 2500 x 2048 CR, CPU")
        print(
            f"    positives per study (untrained net): {statistics.median(s[0] for s in sizes)};"
            f" SR size {statistics.median(s[2] for s in sizes) / 1024:.0f} KiB"
        )
        base = statistics.median(rows["classify"])
        print(f"    classification (forward, CAMs, boxes): median {base:.3f} s")
        for mode in ("composite", "per_finding"):
            value = statistics.median(rows[mode])
            objects = 2 if mode == "composite" else statistics.median(s[1] for s in sizes)
            verdict = "meets" if value <= 1.0 else "MISSES"
            print(
                f"    SR + SC build and encode, {mode:<11} ({objects} objects): median "
                f"{value:.3f} s, max {max(rows[mode]):.3f} s, ratio to classification "
                f"{value / base:.2f}  ({verdict} <= 1 s)"
            )


def latency(studies: int) -> None:
    from pynetdicom import AE

    from dicom_node.db.migrate import upgrade
    from dicom_node.db.session import make_engine
    from dicom_node.service import start_node
    from tests.peers import Orthanc

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        orthanc = Orthanc(root / "orthanc")
        settings = _settings(
            root / "node",
            scheduler=SchedulerSettings(study_quiet_seconds=QUIET, tick_seconds=0.2),
            peers=(
                PeerSettings(name="bench", ae_title="BENCH_SCU", host="127.0.0.1"),
                PeerSettings(
                    name="orthanc",
                    ae_title="ORTHANC",
                    host="127.0.0.1",
                    port=orthanc.dicom_port,
                    send_results=True,
                ),
            ),
        )
        engine = make_engine(settings.database_url)
        upgrade(engine)
        engine.dispose()
        node = start_node(settings, ("scp", "worker"), port=0, metrics_port=0)
        orthanc.start(settings.node.ae_title, node.scp_port)
        try:
            times = [_one_latency(AE, node.scp_port, orthanc, seed) for seed in range(studies)]
        finally:
            node.stop()
            orthanc.stop()
    value = statistics.median(times)
    verdict = "meets" if max(times) <= QUIET + 3 else "MISSES"
    print(
        f"(b) last instance acknowledged -> Orthanc holds the SR, quiet time {QUIET:g} s, "
        f"{studies} one-image studies (1024 x 896 DX), CPU:"
    )
    print(
        f"    median {value:.2f} s, max {max(times):.2f} s; beyond the quiet time: median "
        f"{value - QUIET:.2f} s  ({verdict} <= quiet + 3 s)"
    )


def _one_latency(ae_class: type, port: int, orthanc: object, seed: int) -> float:
    ds = make_cxr_dataset(rows=1024, columns=896, seed=100 + seed)
    ae = ae_class(ae_title="BENCH_SCU")
    ae.add_requested_context(ds.SOPClassUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOM_NODE")
    assoc.send_c_store(ds)
    start = time.perf_counter()
    assoc.release()
    while time.perf_counter() - start < 60:
        found = orthanc.request(
            "POST",
            "/tools/find",
            (
                f'{{"Level": "Instance", "Query": {{"StudyInstanceUID": "{ds.StudyInstanceUID}", '
                f'"Modality": "SR"}}}}'
            ).encode(),
        )
        if found:
            return time.perf_counter() - start
        time.sleep(0.05)
    raise SystemExit("bench: the SR did not reach Orthanc within 60 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=10)
    parser.add_argument("--latency-studies", type=int, default=5)
    args = parser.parse_args()
    configure_logging("WARNING", "console")
    build_times(args.studies)
    latency(args.latency_studies)


if __name__ == "__main__":
    main()
