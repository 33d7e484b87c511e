"""Installed model files: pull, import, verify, and load them without running their code.

Layout: ``<models_dir>/<release file name>`` plus ``registry.json``, which records for each
model name the SHA-256 and size of the first verified install (trust on first use: no hash is
published for the TorchXRayVision release files).  Every later install and load must match.

The DenseNet release files are pickled whole models, and unpickling runs code.  They are only
loaded with ``torch.load(weights_only=True)`` inside ``safe_globals`` that list the
architecture's own classes.  That list was read off torchxrayvision's source; it cannot be
proven against the real release files on machines without them, so a file needing any other
class is refused with the class named, never loaded.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import sys
import urllib.error
import urllib.request
from collections import OrderedDict
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicom_node.errors import ModelError
from dicom_node.inference.catalogue import CATALOGUE, CatalogueEntry
from dicom_node.store import file_sha256

if TYPE_CHECKING:
    from torch import nn

REGISTRY_FILE = "registry.json"


def safe_classes() -> tuple[Any, ...]:
    """The classes a pickled xrv DenseNet release file is made of (torchxrayvision/models.py).

    A function, so that reading and verifying the registry cost no torch import; only the
    loaders below need it."""
    import torchxrayvision as xrv
    from torch import nn

    return (
        xrv.models.DenseNet,
        xrv.models._DenseBlock,
        xrv.models._DenseLayer,
        xrv.models._Transition,
        nn.Conv2d,
        nn.BatchNorm2d,
        nn.ReLU,
        nn.MaxPool2d,
        nn.AvgPool2d,
        nn.AdaptiveAvgPool2d,
        nn.Sequential,
        nn.Linear,
        nn.Dropout,
        OrderedDict,
        set,
    )


def _qualified(cls: Any) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


@dataclass(frozen=True)
class InstalledModel:
    """A registry record: the file and the hash recorded at its first verified install."""

    name: str
    file: str
    sha256: str
    size: int
    source: str
    recorded_at: str
    trust: str = "trust-on-first-use"
    format: str = "xrv-release"
    card: str = ""  # the installed card ("": a catalogue model, whose card is the catalogue's)
    card_sha256: str = ""


def read_registry(models_dir: Path) -> dict[str, InstalledModel]:
    path = models_dir / REGISTRY_FILE
    if not path.exists():
        return {}
    try:
        records = json.loads(path.read_text())["models"]
        return {name: InstalledModel(**record) for name, record in records.items()}
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelError(
            f"{path} is corrupted ({type(exc).__name__}); restore it from backup "
            "or re-import the model files"
        ) from None


def write_registry(models_dir: Path, registry: dict[str, InstalledModel]) -> None:
    temp = models_dir / f".{REGISTRY_FILE}.tmp"
    temp.write_text(
        json.dumps({"models": {n: asdict(r) for n, r in sorted(registry.items())}}, indent=2)
    )
    os.replace(temp, models_dir / REGISTRY_FILE)


def catalogue_entry(name: str) -> CatalogueEntry:
    if name not in CATALOGUE:
        raise ModelError(f"unknown model {name!r}; known: {', '.join(CATALOGUE)}")
    return CATALOGUE[name]


def load_release_file(path: Path, architecture: str, outputs: int, channels: int = 1) -> nn.Module:
    """Load a release-format file (pickled model or state dict) safely and check its shape.

    Raises
    ------
    ModelError
        Naming any class the file needs that is not allowed, or what does not match the
        architecture and label count.
    """
    import torch

    classes = safe_classes()
    allowed = {_qualified(cls) for cls in classes}
    try:
        needed = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as exc:
        raise ModelError(
            f"{path.name} is not a readable torch checkpoint ({type(exc).__name__})"
        ) from None
    refused = sorted(set(needed) - allowed)
    if refused:
        raise ModelError(
            f"{path.name} needs classes that are not on the allow-list, so it is "
            f"not loaded: {', '.join(refused)}"
        )
    try:
        with torch.serialization.safe_globals(list(classes)):
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(f"{path.name} cannot be loaded safely ({type(exc).__name__})") from None
    return into_architecture(loaded, architecture, outputs, channels, path.name)


def load_state_dict_file(path: Path, entry: CatalogueEntry) -> nn.Module:
    """Load an unregistered file as a plain state dict only (``weights_only``, no classes)."""
    import torch

    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(
            f"{path.name} is not a plain state dict ({type(exc).__name__}); "
            "unregistered files load only as state dicts (register a release "
            "file with `dicom-node models import`)"
        ) from None
    return into_architecture(loaded, entry.architecture, len(entry.labels), 1, path.name)


def into_architecture(
    loaded: Any, architecture: str, outputs: int, channels: int, name: str
) -> nn.Module:
    """``loaded`` (a module or state dict) as the architecture, every key and shape checked;
    ``ModelError`` names the first missing, unexpected or wrong-shaped key."""
    from torch import nn

    from dicom_node.inference.networks import build_architecture

    state = loaded.state_dict() if isinstance(loaded, nn.Module) else loaded
    if not isinstance(state, dict):
        raise ModelError(f"{name} holds {type(loaded).__name__}, not a model or state dict")
    network = build_architecture(architecture, outputs, channels)
    expected = network.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(
        k for k in set(expected) & set(state) if tuple(state[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or wrong:
        first = (
            f"missing key {missing[0]!r}"
            if missing
            else f"unexpected key {unexpected[0]!r}"
            if unexpected
            else f"key {wrong[0]!r} has shape {tuple(state[wrong[0]].shape)}, "
            f"not {tuple(expected[wrong[0]].shape)}"
        )
        raise ModelError(
            f"{name} is not a {architecture} with {outputs} outputs and {channels} input "
            f"channel(s): {first} (missing {len(missing)}, unexpected {len(unexpected)}, "
            f"wrong shape {len(wrong)})"
        )
    network.load_state_dict(state)
    return network.eval()


def install(models_dir: Path, name: str, source_file: Path, source: str) -> InstalledModel:
    """Check ``source_file`` against the catalogue and the registry, then install it.

    Raises
    ------
    ModelError
        On a size or SHA-256 mismatch, an unsafe or wrong-shaped file; nothing is installed.
    """
    entry = catalogue_entry(name)
    size, digest = source_file.stat().st_size, file_sha256(source_file)
    if size == 0:
        raise ModelError(f"{source_file.name} is empty")
    if entry.published_size is not None and size != entry.published_size:
        raise ModelError(f"size {size} differs from the published {entry.published_size}")
    if entry.published_sha256 is not None and digest != entry.published_sha256:
        raise ModelError(f"SHA-256 {digest} differs from the published {entry.published_sha256}")
    registry = read_registry(models_dir)
    known = registry.get(name)
    if known is not None and known.sha256 != digest:
        raise ModelError(
            f"SHA-256 {digest} differs from {known.sha256}, recorded for {name} "
            f"at its first install on {known.recorded_at}; refusing it"
        )
    # refuses unsafe or wrong-shaped files
    load_release_file(source_file, entry.architecture, len(entry.labels))
    models_dir.mkdir(parents=True, exist_ok=True)
    target = models_dir / entry.file_name
    if source_file.resolve() != target.resolve():
        shutil.copyfile(source_file, models_dir / f".{entry.file_name}.part")
        os.replace(models_dir / f".{entry.file_name}.part", target)
    record = known or InstalledModel(
        name, entry.file_name, digest, size, source, datetime.now(UTC).isoformat(timespec="seconds")
    )
    registry[name] = record
    write_registry(models_dir, registry)
    return record


def pull(
    models_dir: Path,
    name: str,
    url: str | None = None,
    progress: bool = True,
    timeout: float = 60.0,
) -> InstalledModel:
    """Download the release file (or ``url``, a site mirror), check it, install it."""
    entry = catalogue_entry(name)
    source = url or entry.url
    models_dir.mkdir(parents=True, exist_ok=True)
    partial = models_dir / f".{entry.file_name}.download"
    try:
        _download(source, partial, progress, timeout)
        return install(models_dir, name, partial, source)
    finally:
        partial.unlink(missing_ok=True)


def _download(url: str, target: Path, progress: bool, timeout: float) -> None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, target.open("wb") as out:
            expected = int(response.headers.get("Content-Length") or 0)
            received = 0
            while block := response.read(1 << 20):
                out.write(block)
                received += len(block)
                if progress and expected:
                    print(
                        f"\r  {received / 1e6:7.1f} / {expected / 1e6:.1f} MB "
                        f"[{'#' * int(30 * received / expected):<30}]",
                        end="",
                        file=sys.stderr,
                    )
            if progress:
                print(file=sys.stderr)
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ModelError(f"download from {url} failed: {reason}") from None
    if expected and received != expected:
        raise ModelError(f"download from {url} truncated: {received} of {expected} bytes")


def verify(models_dir: Path) -> list[tuple[str, bool, str]]:
    """Re-check every installed file, and every installed card, against its recorded
    SHA-256: (name, ok, message)."""
    results = []
    for name, record in sorted(read_registry(models_dir).items()):
        results.append((name, *verify_record(models_dir, record)))
    return results


def verify_record(models_dir: Path, record: InstalledModel) -> tuple[bool, str]:
    path = models_dir / record.file
    if not path.exists():
        return False, f"{record.file} is missing"
    if file_sha256(path) != record.sha256:
        return False, f"{record.file} does not match its recorded SHA-256"
    if record.card:
        card = models_dir / record.card
        if not card.is_file():
            return False, f"{record.card} is missing"
        if file_sha256(card) != record.card_sha256:
            return False, f"{record.card} does not match its recorded SHA-256 (edited?)"
        return True, (
            f"{record.file} matches {record.sha256[:16]}…, "
            f"card {record.card_sha256[:16]}… ({record.format})"
        )
    return True, f"{record.file} matches {record.sha256[:16]}…"
