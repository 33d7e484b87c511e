"""Inference benchmark: decode per transfer syntax, analysis overhead, end-to-end throughput.

(a) decode time per image for each transfer syntax of the shared chest X-rays, full and (for
    JPEG 2000) at the reduced resolution the worker uses;
(b) per-image time of the analysis on decoded pixels (crop and resize, classify, CAM, boxes,
    store: CAM archive fsynced and result rows committed in SQLite) against the bare model
    forward on the same prepared batch, and their ratio (target <= 1.3);
(c) images per second end to end (decode + (b)) against the bare forward's (target >= 0.5).
``--tensors-only`` runs the GPU check on prepared tensors alone (no pydicom needed): batched
forward + CAM, DenseNet-121 at 224 px, batch 64, fp16 on CUDA (target >= 500 images/s).

The network is an xrv DenseNet-121 with random weights: the arithmetic is that of the
release weights, the outputs mean nothing.  Usage:
    python bench/inference.py [--images 200] [--batch 8]
    python bench/inference.py --tensors-only [--batch 64] [--device cuda]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED_CXR = REPO.parent / "shared" / "data" / "dicom" / "cxr"


def _network(device: str, fp16: bool) -> torch.nn.Module:
    import torchxrayvision as xrv

    from dicom_node.inference.networks import as_cam_network

    torch.manual_seed(0)
    net = as_cam_network("densenet121", xrv.models.DenseNet(num_classes=18)).to(device)
    return net.half() if fp16 else net


def tensors_only(batch: int, device: str, rounds: int) -> None:
    """Forward + CAM on prepared tensors; no DICOM, no database."""
    fp16 = device.startswith("cuda")
    net = _network(device, fp16)
    x = torch.randn(batch, 1, 224, 224, device=device) * 500
    x = x.half() if fp16 else x

    def step() -> None:
        with torch.inference_mode():
            features = net.feature_map(x)
            probabilities = torch.sigmoid(net.head(features.mean(dim=(2, 3))).float())
            cams = torch.einsum("kc,nchw->nkhw", net.head.weight.to(features.dtype), features)
            probabilities.cpu(), cams.float().cpu()

    for _ in range(3):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(rounds):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    rate = rounds * batch / (time.perf_counter() - started)
    name = torch.cuda.get_device_name(0) if device.startswith("cuda") else "CPU"
    print(
        f"forward + CAM on prepared tensors, batch {batch}, {'fp16' if fp16 else 'fp32'}, "
        f"{name}: {rate:.0f} images/s"
    )


def decode_times(files: list[Path]) -> dict[str, str]:
    """(a) ms per image to decode and normalise, by transfer syntax (median of 3)."""
    from dicom_node.inference.preprocess import decode_for_model, decode_normalised, read_dataset

    def median_ms(decode) -> float:  # type: ignore[no-untyped-def]
        samples = []
        for _ in range(3):
            started = time.perf_counter()
            decode()
            samples.append(time.perf_counter() - started)
        return 1000 * float(np.median(samples))

    times: dict[str, str] = {}
    for path in files:
        syntax = read_dataset(path, 50).file_meta.TransferSyntaxUID
        full = median_ms(lambda path=path: decode_normalised(read_dataset(path, 50)))
        worker = median_ms(lambda path=path: decode_for_model(read_dataset(path, 50), 224))
        times[f"{syntax.name} ({path.name[:24]})"] = (
            f"full {full:7.1f}   as the worker decodes {worker:7.1f}"
        )
    return times


def _bench_database(folder: Path, count: int):  # type: ignore[no-untyped-def]
    """A migrated SQLite node database with ``count`` queued one-image analysis jobs."""
    from dicom_node.clock import utcnow
    from dicom_node.db.migrate import upgrade
    from dicom_node.db.models import Study
    from dicom_node.db.session import make_engine, make_session_factory, session_scope
    from dicom_node.db.upsert import insert_ignore
    from dicom_node.jobs.enqueue import enqueue_analysis

    engine = make_engine(f"sqlite:///{folder / 'bench.db'}")
    upgrade(engine)
    factory = make_session_factory(engine)
    now = utcnow()
    with session_scope(factory) as session:
        for index in range(count):
            uid = f"1.2.826.0.1.3680043.10.1234.7.{index + 1}"
            insert_ignore(
                session,
                Study,
                {
                    "study_instance_uid": uid,
                    "revision": 1,
                    "closed_revision": 1,
                    "first_received_at": now,
                    "last_received_at": now,
                    "instance_count": 1,
                },
            )
            enqueue_analysis(
                session, study_instance_uid=uid, study_revision=1, max_attempts=3, now=now
            )
    return engine, factory


def analysis_overhead(files: list[Path], images: int, batch: int) -> None:
    """(b) and (c), on the shared files repeated to ``images``."""
    from dicom_node.clock import utcnow
    from dicom_node.db.session import session_scope
    from dicom_node.inference.card import catalogue_card
    from dicom_node.inference.catalogue import CATALOGUE
    from dicom_node.inference.models import ModelBundle
    from dicom_node.inference.preprocess import (
        centre_crop_and_resize,
        decode_for_model,
        read_dataset,
    )
    from dicom_node.inference.runtimes import TorchRuntime
    from dicom_node.jobs.analysis import PreparedJob, classify_jobs, store_result
    from dicom_node.jobs.queue import claim_jobs
    from dicom_node.selection import Selection
    from dicom_node.store import prepare_store

    entry = CATALOGUE["densenet121-res224-all"]
    network = _network("cpu", False)
    bundle = ModelBundle(
        catalogue_card(entry),
        TorchRuntime(network.feature_map, network.head, torch.device("cpu")),
        "0" * 64,
        "untrained",
        entry.op_thresholds,
        "torchxrayvision op_threshs",
    )
    folder = Path(tempfile.mkdtemp(prefix="dicom-node-bench-"))
    prepare_store(folder)
    engine, factory = _bench_database(folder, images)
    started = time.perf_counter()  # every image is read and decoded afresh, as a worker does
    decoded = []
    for index in range(images):
        ds = read_dataset(files[index % len(files)], 50)
        decoded.append((*decode_for_model(ds, 224), (int(ds.Rows), int(ds.Columns))))
    decode_seconds = time.perf_counter() - started

    prepared_all = [
        centre_crop_and_resize(image, 224, factor, shape)
        for image, factor, shape in decoded[:batch]
    ]
    inputs = np.stack([p.pixels for p in prepared_all])
    bare = _time_bare_forward(network, inputs, images // batch)

    started = time.perf_counter()
    for offset in range(0, images, batch):
        with session_scope(factory) as session:
            leases = claim_jobs(
                session,
                kind="analysis",
                worker_id="bench",
                limit=batch,
                now=utcnow(),
                lease_seconds=600,
            )
        jobs = [
            PreparedJob(
                lease,
                Selection("1.2.3", "x.dcm", ()),
                centre_crop_and_resize(
                    decoded[offset + i][0], 224, decoded[offset + i][1], decoded[offset + i][2]
                ),
            )
            for i, lease in enumerate(leases)
        ]
        for result in classify_jobs(bundle, jobs, 0.6):
            with session_scope(factory) as session:
                store_result(session, result, bundle, storage_root=folder, now=utcnow())
    analysis = (time.perf_counter() - started) / images
    engine.dispose()
    print(
        f"(b) analysis on decoded pixels: {1000 * analysis:.1f} ms/image; bare forward "
        f"{1000 * bare:.1f} ms/image; ratio {analysis / bare:.2f} (target <= 1.3)"
    )
    end_to_end = images / (decode_seconds + analysis * images)
    print(
        f"(c) end to end: {end_to_end:.1f} images/s (decode {1000 * decode_seconds / images:.0f}"
        f" ms/image); bare forward {1 / bare:.1f} images/s; ratio {end_to_end * bare:.2f} "
        "(target >= 0.5)"
    )


def _time_bare_forward(network, inputs: np.ndarray, rounds: int) -> float:  # type: ignore[no-untyped-def]
    """Seconds per image of the plain forward (no CAM, no I/O) on a prepared batch."""
    tensor = torch.from_numpy(inputs)
    with torch.inference_mode():
        network.body(tensor)
        started = time.perf_counter()
        for _ in range(max(rounds, 1)):
            network.body(tensor)
    return (time.perf_counter() - started) / (max(rounds, 1) * len(inputs))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tensors-only", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    if args.tensors_only:
        tensors_only(args.batch, args.device, args.rounds)
        return 0
    files = sorted(SHARED_CXR.glob("*.dcm"))
    if not files:
        raise SystemExit(f"shared chest X-rays not found at {SHARED_CXR}")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads; "
        f"{len(files)} shared chest X-rays repeated to {args.images}, batch {args.batch}"
    )
    print("(a) decode + normalise, ms per image:")
    for name, text in decode_times(files).items():
        print(f"    {name:<66} {text}")
    analysis_overhead(files, args.images, args.batch)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
