"""``dicom-node models ...`` and ``dicom-node debug preprocess``: the model commands' output.

Imported only when one of these commands runs (it imports torch).  No business logic here,
only calls into the registry, the importers and preprocessing, and the printing of results.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from dicom_node.cli.exits import ExitStatus
from dicom_node.config.settings import Settings
from dicom_node.errors import DicomNodeError
from dicom_node.inference.byom import import_model
from dicom_node.inference.card import known_card
from dicom_node.inference.catalogue import CATALOGUE
from dicom_node.inference.preprocess import prepare
from dicom_node.inference.registry import InstalledModel, install, pull, read_registry, verify


def run_models_command(settings: Settings, args: argparse.Namespace) -> ExitStatus:
    """Run one ``models`` subcommand."""
    models_dir = settings.models_dir
    if args.models_command == "list":
        return _list(settings)
    if args.models_command == "export":
        return _export(settings, args.name, Path(args.out))
    if args.models_command == "pull":
        record = pull(models_dir, args.name, url=args.url)
    elif args.models_command == "import":
        record = _import(settings, args)
    else:
        results = verify(models_dir)
        for name, ok, message in results:
            print(f"{'ok  ' if ok else 'FAIL'} {name}: {message}")
        if not results:
            print("no models installed: run `dicom-node models pull NAME`")
        return ExitStatus.OK if all(ok for _, ok, _ in results) else ExitStatus.FAILURE
    card = f", card SHA-256 {record.card_sha256}" if record.card else ""
    print(
        f"installed {record.name}: {record.file} ({record.format}), SHA-256 {record.sha256}"
        f"{card} ({record.trust}, recorded {record.recorded_at})"
    )
    return ExitStatus.OK


def _import(settings: Settings, args: argparse.Namespace) -> InstalledModel:
    source = Path(args.file)
    if args.card is None and args.name in CATALOGUE and not source.is_dir():
        return install(settings.models_dir, args.name, source, f"import of {args.file}")
    card = Path(args.card) if args.card else None
    return import_model(
        settings.models_dir, args.name, source, card, settings.model.allow_torchscript
    )


def _export(settings: Settings, name: str, out: Path) -> ExitStatus:
    from dicom_node.inference.export import export_onnx

    done = export_onnx(settings, name, out)
    heatmap = "with CAM output" if done.heatmaps else "without heatmap"
    print(
        f"wrote {done.model} ({heatmap}) and its card {done.card}; parity on the probe batch: "
        f"max |probability difference| = {done.max_difference:.2e} (limit 1e-04)"
    )
    print(f"import it: dicom-node models import {done.model} --card {done.card} --name NAME")
    return ExitStatus.OK


def _list(settings: Settings) -> ExitStatus:
    registry = read_registry(settings.models_dir)
    modes = {spec.catalogue: spec.mode for spec in settings.model_specs}
    print(f"models folder: {settings.models_dir}")
    names = [*CATALOGUE, *sorted(n for n in registry if n not in CATALOGUE)]
    for name in names:
        marker = "*" if name in modes else " "
        record = registry.get(name)
        try:
            card = known_card(name, settings.models_dir)
        except DicomNodeError as exc:
            print(f"{marker} {name:<28} card unreadable: {exc}")
            continue
        if card is None:
            print(f"{marker} {name:<28} registry record without a card: import it again")
            continue
        installed = (
            f"installed, SHA-256 {record.sha256[:16]}… ({record.trust})"
            if record
            else "not installed"
        )
        print(
            f"{marker} {name:<28} {card.format:<11} {card.architecture or '-':<11} "
            f"{card.resolution:>4} px {len(card.reported):>2} findings  "
            f"card {card.card_sha256[:12]}…  mode {modes.get(name, '-'):<6} {installed}"
        )
    print(
        "* = configured (mode as configured; `dicom-node models promote/demote` changes it).  "
        "No SHA-256 is published for the catalogue's files; the first verified install is "
        "recorded and every later load must match it."
    )
    return ExitStatus.OK


def run_debug_preprocess(settings: Settings, args: argparse.Namespace) -> ExitStatus:
    """``debug preprocess FILE --out OUT``."""
    return debug_preprocess(settings, Path(args.file), Path(args.out))


def debug_preprocess(settings: Settings, path: Path, out: Path) -> ExitStatus:
    """Write the model input of ``path`` (as the configured model sees it) to ``out``."""
    try:
        card = known_card(settings.model.name, settings.models_dir)
    except DicomNodeError:
        card = None
    resolution = card.resolution if card else 224
    prepared = prepare(
        path,
        resolution=resolution,
        max_megapixels=settings.analysis.max_megapixels,
        apply_lut=settings.analysis.apply_voi_lut,
    )
    np.save(out, prepared.pixels)
    g = prepared.geometry
    print(
        f"wrote {out}: shape {prepared.pixels.shape}, range [{prepared.pixels.min():.1f}, "
        f"{prepared.pixels.max():.1f}]; crop {g.crop_size} px at row {g.crop_top}, "
        f"column {g.crop_left} of {g.source_rows}x{g.source_columns}"
    )
    return ExitStatus.OK
