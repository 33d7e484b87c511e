"""Import a site's own model (ONNX, safetensors, TorchScript, a MONAI bundle) with its card.

Installed layout: ``<models_dir>/<NAME>/model.toml`` (the card, byte for byte as given or as
read from the bundle) beside ``<models_dir>/<NAME>/model.<ext>``, and a ``registry.json``
record with both SHA-256s.  A name is bound to one file and one card at its first import
(results name the model by it); importing the same pair again changes nothing, another pair
under the same name is refused.
"""

from __future__ import annotations

import os
import re
import shutil
from datetime import UTC, datetime
from pathlib import Path

from dicom_node.errors import ModelError
from dicom_node.inference.card import (
    CARD_FILE,
    ModelCard,
    card_sha256,
    check_against_format,
    parse_card,
)
from dicom_node.inference.catalogue import CATALOGUE
from dicom_node.inference.formats import check_model_file
from dicom_node.inference.monai import bundle_card, is_bundle
from dicom_node.inference.registry import InstalledModel, read_registry, write_registry
from dicom_node.store import file_sha256

EXTENSIONS = {"onnx": "onnx", "safetensors": "safetensors", "torchscript": "pt"}
EXTENSIONS["xrv-release"] = "pt"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def check_name(name: str) -> None:
    if name in CATALOGUE:
        raise ModelError(
            f"{name!r} is a catalogue model; a model with its own card needs a name of its own"
        )
    if not _NAME.fullmatch(name):
        raise ModelError(
            f"model name {name!r}: use 1-64 letters, digits, '.', '_' or '-' (a folder name)"
        )


def read_import(source: Path, card_path: Path | None, name: str) -> tuple[str, Path]:
    """The card text and the weights file of an import (a file with a card, or a bundle)."""
    supplement = None
    if card_path is not None:
        try:
            supplement = card_path.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ModelError(f"{card_path}: cannot be read ({type(exc).__name__})") from None
    if is_bundle(source):
        return bundle_card(source, supplement)
    if source.is_dir():
        raise ModelError(f"{source} is a folder without configs/metadata.json (not a bundle)")
    if not source.is_file():
        raise ModelError(f"{source} does not exist")
    if supplement is None:
        raise ModelError(f"{name}: a model of a site's own needs --card CARD.toml")
    return supplement, source


def import_model(
    models_dir: Path,
    name: str,
    source: Path,
    card_path: Path | None,
    allow_torchscript: bool = False,
) -> InstalledModel:
    """Check the card and the file (without running its code), then install both.

    Raises
    ------
    ModelError
        One line naming the card key, the file's problem, or the registry conflict;
        nothing is installed.
    """
    check_name(name)
    card_text, weights = read_import(source, card_path, name)
    card = parse_card(card_text, name, card_path.name if card_path else CARD_FILE)
    check_against_format(card)
    digest = file_sha256(weights)
    if card.weights_sha256 and digest != card.weights_sha256:
        raise ModelError(
            f"{weights.name}: SHA-256 {digest} differs from the card's weights_sha256 "
            f"{card.weights_sha256}"
        )
    known = read_registry(models_dir).get(name)
    if known is not None and (known.sha256, known.card_sha256) != (digest, card.card_sha256):
        raise ModelError(
            f"{name} was imported on {known.recorded_at} with another file or card; "
            "results name models by their name, so import this one under a new name"
        )
    check_model_file(weights, card, allow_torchscript)
    return _install(models_dir, card, card_text, weights, digest, f"import of {source}")


def _install(
    models_dir: Path, card: ModelCard, card_text: str, weights: Path, digest: str, source: str
) -> InstalledModel:
    folder = models_dir / card.name
    folder.mkdir(parents=True, exist_ok=True)
    file_name = f"model.{EXTENSIONS[card.format]}"
    _copy_atomic(weights, folder / file_name)
    part = folder / f".{CARD_FILE}.part"
    with part.open("wb") as out:
        out.write(card_text.encode("utf-8"))
        out.flush()
        os.fsync(out.fileno())
    os.replace(part, folder / CARD_FILE)
    registry = read_registry(models_dir)
    record = registry.get(card.name) or InstalledModel(
        name=card.name,
        file=f"{card.name}/{file_name}",
        sha256=digest,
        size=weights.stat().st_size,
        source=source,
        recorded_at=datetime.now(UTC).isoformat(timespec="seconds"),
        format=card.format,
        card=f"{card.name}/{CARD_FILE}",
        card_sha256=card_sha256(card_text),
    )
    registry[card.name] = record
    write_registry(models_dir, registry)
    return record


def _copy_atomic(source: Path, target: Path) -> None:
    if source.resolve() == target.resolve():
        return
    part = target.with_name(f".{target.name}.part")
    shutil.copyfile(source, part)
    with part.open("rb") as written:
        os.fsync(written.fileno())
    os.replace(part, target)
