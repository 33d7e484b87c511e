"""Nodes-scale benchmark: 1, 2 and 3 ``dicom-node serve`` processes on one PostgreSQL and one
shared storage root, several DCMTK senders spread over them, same run.

For each node count a fresh database (in one throwaway PostgreSQL cluster of this run, fsync
and synchronous_commit on as shipped) and a fresh storage root shared by all its nodes; each
node runs the SCP and worker roles on its own port (no web, no metrics).  ``--senders``
``storescu`` processes start together, sender *i* sending its share of the studies (whole
studies, one association) to node *i mod n*.  Measured, from the first send:

* ingest: instances/s until every instance is acknowledged (the last storescu exits);
* analysis: studies/s until every study's analysis job is done (its ``updated_at`` in the
  jobs table), studies closing ``--quiet-seconds`` after their last instance, while the
  other studies are still arriving.

Then the ratios 2 nodes / 1 node and 3 nodes / 1 node against the targets (>= 1.8, >= 2.5).

**A tiny model** does the analysis: a TorchScript network of one pooling and one 1x1
convolution (64x64 input, 18 outputs, random weights set so that one finding is positive),
imported with its card like a site's own model, so that what is measured is the database, the
shared store and the node's own code, not a DenseNet on the CPU.  Outputs (SR, SC) are built
and stored as usual; no peer has ``send_results``, so nothing is delivered.  **This machine
has 2 CPU cores**, shared by every node, the PostgreSQL server and the senders: real
parallelism is limited, and the ratios say more about contention than about what more hosts
would give.  The CPU the node processes used per study is printed beside the rates: flat
across node counts means adding a node costs no coordination work, only cores.

Each round is also checked: every C-STORE answered Success; every instance stored once, row
and file; one analysis job per study revision, each claimed once, each done with one result;
and no error, lease loss, rescue, conflict, lock or connection failure in any node's log.

Usage: python bench/nodes.py [--studies 200] [--instances-per-study 2] [--senders 6]
                             [--max-nodes 3] [--quiet-seconds 1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import psycopg

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dicom_node.dev.samples import make_cxr_dataset  # noqa: E402
from tests.helpers import NodeProcess, free_port, postgres_cluster, run_cli, write_config  # noqa: E402

BENCH_AE = "TEST_SCU"  # the peer the test config accepts
TINY_MODEL = "bench-tiny"
TINY_SIZE = 64  # the tiny model's input (pixels a side)
TARGETS = {2: 1.8, 3: 2.5}  # aggregate throughput of n nodes / one node
# Log words that mean a writer or a connection failed rather than waited its turn.
FAILURE_WORDS = ("database is locked", "OperationalError", "QueuePool limit", "could not connect")
PROBLEM_EVENTS = ("job.lease_lost", "job.rescued", "jobs.rescued", "instance.conflict")


@dataclass
class Round:
    """One node count's figures and what its checks found."""

    nodes: int
    instances: int
    studies: int
    ingest_seconds: float = 0.0
    analysis_seconds: float = 0.0
    statuses: Counter[str] = field(default_factory=Counter)
    claims: Counter[int] = field(default_factory=Counter)  # analysis claims per node
    reopened: int = 0  # studies that got a second revision (an instance after their close)
    cpu_seconds: float = 0.0  # user + system CPU of all node processes, start to end
    problems: list[str] = field(default_factory=list)

    @property
    def ingest_rate(self) -> float:
        return self.instances / self.ingest_seconds

    @property
    def analysis_rate(self) -> float:
        return self.studies / self.analysis_seconds


def generate(folder: Path, studies: int, per_study: int) -> list[list[Path]]:
    """``studies`` studies of ``per_study`` 512x512 CR instances each (one phantom's pixels)."""
    template = make_cxr_dataset(modality="CR", rows=512, columns=512, bits_stored=12)
    result = []
    for number in range(studies):
        study = make_cxr_dataset(modality="CR", rows=8, columns=8)
        study_uid, series_uid = study.StudyInstanceUID, study.SeriesInstanceUID
        paths = []
        for index in range(per_study):
            ds = make_cxr_dataset(modality="CR", rows=8, columns=8)
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
            ds.Rows, ds.Columns, ds.PixelData = template.Rows, template.Columns, template.PixelData
            ds.InstanceNumber = index + 1
            path = folder / f"s{number:05d}-{index:02d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
        result.append(paths)
    return result


def install_tiny_model(folder: Path, models_dir: Path) -> None:
    """Script the tiny network, write its card and import both (as ``models import`` does)."""
    import torch
    from torch import nn

    from dicom_node.inference.byom import import_model
    from dicom_node.inference.card import thresholds_table
    from dicom_node.inference.catalogue import CATALOGUE
    from dicom_node.inference.toml_writer import render_card

    entry = CATALOGUE["densenet121-res224-all"]  # its labels and operating points

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(nn.AvgPool2d(8), nn.Conv2d(1, 8, 1))
            self.classifier = nn.Linear(8, len(entry.labels))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.classifier(torch.relu(self.features(x)).mean(dim=(2, 3)))

    torch.manual_seed(0)
    network = Tiny().eval()
    with torch.no_grad():  # one finding positive (with a box), the rest clearly negative
        network.classifier.weight.mul_(0.01)
        network.classifier.bias.fill_(-8.0)
        network.classifier.bias[entry.labels.index("Effusion")] = 8.0
    torch.jit.script(network).save(str(folder / "tiny.pt"))
    card = {
        "format": "torchscript",
        "labels": list(entry.labels),
        "version": "bench-1",
        "intended_use": "benchmarks only (random weights)",
        "source": "bench/nodes.py; random weights; licence CC0",
        "input": {"size": TINY_SIZE, "channels": 1},
        "preprocessing": {"recipe": "xrv"},
        "heatmap": {"features": "features", "classifier": "classifier", "relu": True},
        "thresholds": thresholds_table(entry.labels, entry.op_thresholds),
    }
    (folder / "tiny.toml").write_text(render_card(card), encoding="utf-8")
    import_model(models_dir, TINY_MODEL, folder / "tiny.pt", folder / "tiny.toml", True)


def node_config(
    path: Path, root: Path, db_url: str, models_dir: Path, quiet: float, associations: int
) -> tuple[Path, int]:
    """One node's config: the shared database and root, its own port, the tiny model."""
    port = free_port()
    write_config(
        path,
        root=root,
        db_url=db_url,
        port=port,
        models_dir=models_dir,
        quiet_seconds=quiet,
        batch_size=8,
        extra=f"[scp]\nmax_associations = {associations}\n[metrics]\nenabled = false\n",
    )
    model = f'[model]\nname = "{TINY_MODEL}"\nallow_torchscript = true\nthreads = 1\n'
    path.write_text(path.read_text().replace("[model]\n", model + 'device = "cpu"\n', 1))
    return path, port


def send_one(port: int, files: list[Path]) -> Counter[str]:
    """One ``storescu`` association sending ``files``; its answers counted by status text."""
    result = subprocess.run(
        ["storescu", "-v", "-aet", BENCH_AE, "-aec", "DICOM_NODE", "127.0.0.1", str(port)]
        + [str(path) for path in files],
        capture_output=True,
        text=True,
    )
    answers: Counter[str] = Counter()
    for line in (result.stdout + result.stderr).splitlines():
        if "Received Store Response (" in line:
            answers[line.split("Received Store Response (", 1)[1].rstrip(")")] += 1
        elif line.startswith(("E:", "F:")):
            answers[f"storescu error: {line[2:].strip()[:80]}"] += 1
    unanswered = len(files) - sum(answers.values())
    if unanswered > 0 or result.returncode != 0:
        answers[f"not answered (storescu exit {result.returncode})"] += max(unanswered, 1)
    return answers


def shares(studies: list[list[Path]], senders: int) -> list[list[Path]]:
    """Sender *i*'s files: every ``senders``-th study, whole."""
    return [[p for study in studies[i::senders] for p in study] for i in range(senders)]


def wait_analysed(plain_url: str, studies: int, timeout: float) -> datetime | None:
    """When the last study's latest analysis job was done (jobs.updated_at); None when not
    every study was settled within ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with psycopg.connect(plain_url) as connection:
            settled, last = connection.execute(
                "SELECT count(*), max(j.updated_at) FROM studies s JOIN jobs j"
                " ON j.study_instance_uid = s.study_instance_uid"
                " AND j.study_revision = s.revision AND j.kind = 'analysis'"
                " WHERE j.state IN ('done', 'skipped', 'dead')"
            ).fetchone() or (0, None)
        if settled >= studies:
            return last if last.tzinfo else last.replace(tzinfo=UTC)
        time.sleep(0.5)
    return None


def run_round(
    folder: Path,
    studies: list[list[Path]],
    nodes: int,
    args: argparse.Namespace,
    db_url: str,
    models_dir: Path,
) -> Round:
    """Start ``nodes`` nodes on ``db_url`` and one fresh root, send, wait, check, stop."""
    folder.mkdir()
    root, per_node = folder / "shared-root", -(-args.senders // nodes)
    configs = [
        node_config(
            folder / f"node{i}.toml", root, db_url, models_dir, args.quiet_seconds, per_node
        )
        for i in range(nodes)
    ]
    if run_cli(configs[0][0], "db", "upgrade").returncode != 0:
        raise SystemExit("db upgrade failed")
    processes = [NodeProcess(path, path.with_suffix(".log")) for path, _ in configs]
    total = sum(len(study) for study in studies)
    result = Round(nodes, total, len(studies))
    try:
        for process in processes:
            process.spawn("scp", "worker")  # side by side: each loads torch and its model
        for process, (_, port) in zip(processes, configs, strict=True):
            process.wait_answering(port, 120)
        started_cpu = sum(map(cpu_seconds, processes))
        result.problems += measure(result, studies, [port for _, port in configs], args, db_url)
        result.cpu_seconds = sum(map(cpu_seconds, processes)) - started_cpu
        pids = {process.process.pid: i for i, process in enumerate(processes) if process.process}
    finally:
        codes = [process.stop() for process in processes]
    result.problems += [f"node {i} exited with {code}" for i, code in enumerate(codes) if code]
    result.problems += check(result, plain(db_url), root, len(studies[0]), pids)
    for i, process in enumerate(processes):
        result.problems += [f"node {i} log: {line}" for line in log_problems(process.log_path)]
    shutil.rmtree(root, ignore_errors=True)
    return result


def measure(
    result: Round, studies: list[list[Path]], ports: list[int], args: argparse.Namespace, url: str
) -> list[str]:
    """Send every study (sender *i* to node *i mod n*) and time ingest and analysis."""
    loads = shares(studies, args.senders)
    started_at, started = datetime.now(UTC), time.perf_counter()
    with ThreadPoolExecutor(args.senders) as pool:
        answers = list(
            pool.map(lambda i: send_one(ports[i % len(ports)], loads[i]), range(args.senders))
        )
    result.ingest_seconds = time.perf_counter() - started
    result.statuses = sum(answers, Counter())
    done_at = wait_analysed(plain(url), len(studies), args.timeout)
    if done_at is None:
        result.analysis_seconds = float("nan")
        return [f"not every study was analysed within {args.timeout:g} s"]
    result.analysis_seconds = (done_at - started_at).total_seconds()
    failed = {status: n for status, n in result.statuses.items() if status != "Success"}
    return [f"C-STORE answers other than Success: {failed}"] if failed else []


# Each must count zero after a round (a job claimed again was retried: an attempt failed).
ZERO_COUNTS = {
    "jobs claimed more than once": "SELECT count(*) FROM (SELECT job_id FROM job_claims"
    " GROUP BY job_id HAVING count(*) > 1) AS again",
    "study revisions with two analysis jobs": "SELECT count(*) FROM (SELECT 1 FROM jobs"
    " WHERE kind = 'analysis' GROUP BY study_instance_uid, study_revision"
    " HAVING count(*) > 1) AS doubled",
    "done analyses without one result": "SELECT count(*) FROM jobs j WHERE j.kind = 'analysis'"
    " AND j.state = 'done' AND (SELECT count(*) FROM analysis_results r WHERE r.job_id = j.id)"
    " <> 1",
    "jobs neither done nor superseded": "SELECT count(*) FROM jobs"
    " WHERE state NOT IN ('done', 'superseded')",
}


def check(result: Round, url: str, root: Path, per_study: int, pids: dict[int, int]) -> list[str]:
    """What must hold after any run, read from the database and the shared root; also the
    analysis claims per node and the studies reopened."""
    with psycopg.connect(url) as connection:
        sql = connection.execute
        found = {name: scalar(connection, query) for name, query in ZERO_COUNTS.items()}
        counts: dict[int, int] = dict(
            sql("SELECT instance_count, count(*) FROM studies GROUP BY 1").fetchall()
        )
        paths = {path for (path,) in sql("SELECT path FROM instances").fetchall()}
        result.reopened = scalar(connection, "SELECT count(*) FROM studies WHERE revision > 1")
        workers = sql(
            "SELECT c.worker_id FROM job_claims c JOIN jobs j ON j.id = c.job_id"
            " WHERE j.kind = 'analysis'"
        ).fetchall()
    problems = [f"{n} {name}" for name, n in found.items() if n]
    if counts != {per_study: result.studies} or len(paths) != result.instances:
        problems.append(f"stored: {len(paths)} instance rows, studies by count {counts}")
    files = {str(p.relative_to(root)) for p in (root / "instances").rglob("*") if p.is_file()}
    if files != paths:
        problems.append(
            f"{len(paths - files)} rows without their file, {len(files - paths)} files "
            "without a row in the shared root"
        )
    result.claims = Counter(pids.get(int(worker.split(":")[1]), -1) for (worker,) in workers)
    return problems


def scalar(connection: psycopg.Connection, query: str) -> int:
    row = connection.execute(query).fetchone()
    return int(row[0]) if row else 0


def log_problems(path: Path) -> list[str]:
    """Error lines, lease losses, rescues, conflicts, lock or connection failures, and any
    line that is not one of the node's JSON lines (a traceback)."""
    found = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            found.append(line[:200])
            continue
        if (
            entry.get("level") in ("error", "critical")
            or entry.get("event") in PROBLEM_EVENTS
            or any(word in line for word in FAILURE_WORDS)
        ):
            found.append(line[:300])
    return found


def cpu_seconds(process: NodeProcess) -> float:
    """User + system CPU seconds the node process has used so far (``/proc``)."""
    assert process.process is not None
    fields = Path(f"/proc/{process.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def plain(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


def report(rounds: list[Round], megabytes: float) -> None:
    """The table (node CPU per study: flat when adding nodes costs no coordination work)
    and each ratio to one node against its target."""
    print(
        f"{'nodes':>5} {'ingest s':>9} {'inst/s':>8} {'MB/s':>7} {'analysed s':>11} "
        f"{'studies/s':>10} {'node CPU s/study':>17}  analysis claims per node"
    )
    for r in rounds:
        claims = " ".join(f"{r.claims[i]}" for i in range(r.nodes))
        print(
            f"{r.nodes:>5} {r.ingest_seconds:>9.2f} {r.ingest_rate:>8.1f} "
            f"{megabytes / r.ingest_seconds:>7.1f} {r.analysis_seconds:>11.2f} "
            f"{r.analysis_rate:>10.2f} {r.cpu_seconds / r.studies:>17.3f}  {claims}"
            + (
                f"  ({r.reopened} studies reopened: an instance after the close)"
                if r.reopened
                else ""
            )
        )
    one = rounds[0]
    for r in rounds[1:]:
        target = TARGETS.get(r.nodes)
        for name, ratio in (
            ("ingest", r.ingest_rate / one.ingest_rate),
            ("analysis", r.analysis_rate / one.analysis_rate),
        ):
            verdict = "" if target is None else (" met" if ratio >= target else " MISSED")
            wanted = f" (target >= {target})" if target else ""
            print(f"ratio {r.nodes} nodes / 1 node, {name}: {ratio:.2f}{wanted}{verdict}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=200)
    parser.add_argument("--instances-per-study", type=int, default=2)
    parser.add_argument("--senders", type=int, default=6, help="storescu processes at once")
    parser.add_argument("--max-nodes", type=int, default=3)
    parser.add_argument("--quiet-seconds", type=float, default=1.0, help="study close delay")
    parser.add_argument("--timeout", type=float, default=900.0, help="per round, for analysis")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="dicom-node-nodes-"))
    rounds = []
    try:
        studies = generate(folder, args.studies, args.instances_per_study)
        megabytes = sum(p.stat().st_size for study in studies for p in study) / 1e6
        install_tiny_model(folder, folder / "models")
        print(
            f"{args.studies} studies x {args.instances_per_study} CR 512x512 "
            f"({args.studies * args.instances_per_study} instances, {megabytes:.0f} MB), "
            f"{args.senders} storescu senders spread over the nodes, one PostgreSQL, one "
            f"shared root; tiny model ({TINY_SIZE}x{TINY_SIZE} TorchScript, random weights); "
            "this machine has 2 CPU cores shared by all nodes, PostgreSQL and the senders"
        )
        with postgres_cluster("dicom-node-nodes-pg-", "max_connections=200") as cluster:
            for nodes in range(1, args.max_nodes + 1):
                url = f"{cluster.server_url}/nodes_{nodes}"
                with psycopg.connect(f"{plain(cluster.url)}", autocommit=True) as connection:
                    connection.execute(f"CREATE DATABASE nodes_{nodes}")
                rounds.append(
                    run_round(folder / f"n{nodes}", studies, nodes, args, url, folder / "models")
                )
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    report(rounds, megabytes)
    problems = [(r.nodes, p) for r in rounds for p in r.problems]
    for nodes, problem in problems:
        print(f"PROBLEM ({nodes} nodes): {problem}")
    print("no correctness problem found" if not problems else f"PROBLEMS: {len(problems)}")
    return 0 if not problems else 1


if __name__ == "__main__":
    raise SystemExit(main())
