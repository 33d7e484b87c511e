"""Inference benchmark: decode per transfer syntax, analysis overhead, end-to-end throughput,
each runtime (torch eager and onnxruntime) side by side in the same run.

(a) decode time per image for each transfer syntax of the shared chest X-rays, full and (for
    JPEG 2000) at the reduced resolution the worker uses;
(b) per runtime: per-image time of the analysis on decoded pixels (crop and resize, classify,
    CAM, boxes, store: CAM archive fsynced and result rows committed in SQLite) against that
    runtime's bare forward + CAM on the same prepared batch (target <= 1.3), and the
    onnxruntime / torch ratio of images per second (target >= 1.3);
(c) images per second end to end (decode + (b)) per runtime, against the bare forward's
    (target >= 0.5).
``--tensors-only`` runs the GPU check on prepared tensors alone (no pydicom needed): batched
forward + CAM, DenseNet-121 at 224 px, both runtimes (torch fp16 on CUDA; onnxruntime fp32,
with its CUDA provider when installed) (target >= 1,000 images/s).

The network is an xrv DenseNet-121 with seeded random weights, exported to ONNX in the same
run: the arithmetic is that of the release weights, the outputs mean nothing.  Usage:
    python bench/inference.py [--images 200] [--batch 8] [--threads 2]
    python bench/inference.py --tensors-only [--batch 64] [--device cuda]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

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


def runtimes(device: str, threads: int, folder: Path) -> dict[str, Any]:
    """The same seeded network on torch eager and, exported to ONNX, on onnxruntime."""
    from dicom_node.inference.card import catalogue_card
    from dicom_node.inference.catalogue import CATALOGUE
    from dicom_node.inference.export import write_onnx
    from dicom_node.inference.models import ModelBundle
    from dicom_node.inference.runtimes import TorchRuntime, onnx_runtime

    card = catalogue_card(CATALOGUE["densenet121-res224-all"])
    if threads:
        torch.set_num_threads(threads)
    fp16 = device.startswith("cuda")
    net = _network(device, fp16)
    eager = TorchRuntime(net.feature_map, net.head, torch.device(device), fp16)
    cpu_net = _network("cpu", False)
    cpu = TorchRuntime(cpu_net.feature_map, cpu_net.head, torch.device("cpu"))
    bundle = ModelBundle(card, cpu, "0" * 64, "untrained", card.op_thresholds, "bench")
    onnx_card = write_onnx(bundle, folder / "bench.onnx", folder / "bench.onnx.toml")
    ort = onnx_runtime(folder / "bench.onnx", onnx_card, threads, device)
    return {"card": card, "torch": eager, "onnxruntime": ort}


def _rate(runtime: Any, inputs: np.ndarray, rounds: int) -> float:
    """Images per second of ``runtime.run`` (forward + CAM, results on the host)."""
    for _ in range(2):
        runtime.run(inputs)
    started = time.perf_counter()
    for _ in range(max(rounds, 1)):
        runtime.run(inputs)
    return max(rounds, 1) * len(inputs) / (time.perf_counter() - started)


def tensors_only(batch: int, device: str, rounds: int, threads: int) -> None:
    """Forward + CAM on prepared tensors, both runtimes; no DICOM, no database."""
    import onnxruntime as ort

    folder = Path(tempfile.mkdtemp(prefix="dicom-node-bench-"))
    found = runtimes(device, threads, folder)
    inputs = (np.random.default_rng(0).standard_normal((batch, 1, 224, 224)) * 500).astype(
        np.float32
    )
    name = torch.cuda.get_device_name(0) if device.startswith("cuda") else "CPU"
    providers = found["onnxruntime"].session.get_providers()
    rates = {kind: _rate(found[kind], inputs, rounds) for kind in ("torch", "onnxruntime")}
    print(f"forward + CAM on prepared tensors, batch {batch}, {name} (target >= 1000 images/s):")
    print(f"    torch        {'fp16' if device.startswith('cuda') else 'fp32'}: "
          f"{rates['torch']:8.1f} images/s")  # fmt: skip
    print(f"    onnxruntime  fp32 ({providers[0]}, onnxruntime {ort.__version__}): "
          f"{rates['onnxruntime']:8.1f} images/s")  # fmt: skip
    print(f"    ratio onnxruntime / torch: {rates['onnxruntime'] / rates['torch']:.2f}")


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


def _decode(files: list[Path], images: int) -> tuple[list[Any], float]:
    """Every image read and decoded afresh, as a worker does; and the seconds it took."""
    from dicom_node.inference.preprocess import decode_for_model, read_dataset

    started = time.perf_counter()
    decoded = []
    for index in range(images):
        ds = read_dataset(files[index % len(files)], 50)
        image, factor = decode_for_model(ds, 224)
        decoded.append((image, 224, factor, (int(ds.Rows), int(ds.Columns))))
    return decoded, time.perf_counter() - started


def _analyse(bundle: Any, decoded: list[Any], batch: int, folder: Path) -> float:
    """Seconds per image of the worker's analysis path on decoded pixels, stored in SQLite."""
    from dicom_node.clock import utcnow
    from dicom_node.db.session import session_scope
    from dicom_node.inference.preprocess import centre_crop_and_resize
    from dicom_node.jobs.analysis import PreparedJob, classify_jobs, store_result
    from dicom_node.jobs.queue import claim_jobs
    from dicom_node.selection import Selection
    from dicom_node.store import prepare_store

    prepare_store(folder)
    engine, factory = _bench_database(folder, len(decoded))
    started = time.perf_counter()
    for offset in range(0, len(decoded), batch):
        with session_scope(factory) as session:
            leases = claim_jobs(session, kind="analysis", worker_id="bench", limit=batch,
                                now=utcnow(), lease_seconds=600)  # fmt: skip
        jobs = [
            PreparedJob(
                lease, Selection("1.2.3", "x.dcm", ()), centre_crop_and_resize(*decoded[offset + i])
            )  # fmt: skip
            for i, lease in enumerate(leases)
        ]
        for result in classify_jobs(bundle, jobs, 0.6):
            with session_scope(factory) as session:
                store_result(session, result, bundle, storage_root=folder, now=utcnow())
    seconds = (time.perf_counter() - started) / len(decoded)
    engine.dispose()
    return seconds


def analysis_overhead(files: list[Path], images: int, batch: int, threads: int) -> None:
    """(b) and (c) per runtime, on the shared files repeated to ``images``."""
    from dicom_node.inference.models import ModelBundle
    from dicom_node.inference.preprocess import centre_crop_and_resize

    folder = Path(tempfile.mkdtemp(prefix="dicom-node-bench-"))
    found = runtimes("cpu", threads, folder)
    card = found["card"]
    decoded, decode_seconds = _decode(files, images)
    inputs = np.stack([centre_crop_and_resize(*d).pixels for d in decoded[:batch]])
    rows: dict[str, tuple[float, float, float]] = {}  # seconds per image: analysis, bare, e2e
    for kind in ("torch", "onnxruntime"):
        bundle = ModelBundle(card, found[kind], "0" * 64, "untrained", card.op_thresholds, "b")
        bare = 1 / _rate(found[kind], inputs, max(images // batch, 3))
        analysis = _analyse(bundle, decoded, batch, folder / kind)
        rows[kind] = (analysis, bare, decode_seconds / images + analysis)
    _print_rows(rows, batch, threads)


def _print_rows(rows: dict[str, tuple[float, float, float]], batch: int, threads: int) -> None:
    """The per-runtime table of (b), bare forward + CAM and (c), each with its ratios."""
    titles = (
        "(b) analysis on decoded pixels (crop, classify, CAM, boxes, store)",
        "    forward + CAM alone on the prepared batch (runtime.run)",
        "(c) end to end (decode + (b))",
    )
    for column, title in enumerate(titles):
        print(f"{title}, DenseNet-121 224 px, batch {batch}, {threads} threads, CPU:")
        print(f"    {'runtime':<12} | {'ms/image':>8} | {'images/s':>8}")
        for kind, seconds in rows.items():
            print(f"    {kind:<12} | {1000 * seconds[column]:8.1f} | {1 / seconds[column]:8.1f}")
        ratio = rows["torch"][column] / rows["onnxruntime"][column]
        target = " (target >= 1.3)" if column == 0 else ""
        print(f"    ratio onnxruntime / torch images/s: {ratio:.2f}{target}")
    for kind, (analysis, bare, end_to_end) in rows.items():
        print(
            f"    {kind:<12} (b) / bare {analysis / bare:.2f} (target <= 1.3); "
            f"(c) / bare images/s {bare / end_to_end:.2f} (target >= 0.5)"
        )
    decode = rows["torch"][2] - rows["torch"][0]
    print(f"    decode (as the worker decodes, in (c)): {1000 * decode:.1f} ms/image")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tensors-only", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of both runtimes")
    args = parser.parse_args()
    if args.tensors_only:
        tensors_only(args.batch, args.device, args.rounds, args.threads)
        return 0
    files = sorted(SHARED_CXR.glob("*.dcm"))
    if not files:
        raise SystemExit(f"shared chest X-rays not found at {SHARED_CXR}")
    print(
        f"torch {torch.__version__}, {args.threads} CPU threads for each runtime; "
        f"{len(files)} shared chest X-rays repeated to {args.images}, batch {args.batch}"
    )
    print("(a) decode + normalise, ms per image:")
    for name, text in decode_times(files).items():
        print(f"    {name:<66} {text}")
    analysis_overhead(files, args.images, args.batch, args.threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
