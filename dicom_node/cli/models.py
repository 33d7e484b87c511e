"""``dicom-node models ...`` and ``dicom-node debug preprocess``: the model commands' output.

Imported only when one of these commands runs (it imports torch).  No business logic here,
only calls into the registry and preprocessing and the printing of their results.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from dicom_node.cli.exits import ExitStatus
from dicom_node.config.settings import Settings
from dicom_node.inference.catalogue import CATALOGUE
from dicom_node.inference.preprocess import prepare
from dicom_node.inference.registry import install, pull, read_registry, verify


def run_models_command(settings: Settings, args: argparse.Namespace) -> ExitStatus:
    """Run one ``models`` subcommand."""
    models_dir = settings.models_dir
    if args.models_command == "list":
        return _list(settings)
    if args.models_command == "pull":
        record = pull(models_dir, args.name, url=args.url)
    elif args.models_command == "import":
        record = install(models_dir, args.name, Path(args.file), f"import of {args.file}")
    else:
        results = verify(models_dir)
        for name, ok, message in results:
            print(f"{'ok  ' if ok else 'FAIL'} {name}: {message}")
        if not results:
            print("no models installed: run `dicom-node models pull NAME`")
        return ExitStatus.OK if all(ok for _, ok, _ in results) else ExitStatus.FAILURE
    print(
        f"installed {record.name}: {record.file}, SHA-256 {record.sha256} "
        f"({record.trust}, recorded {record.recorded_at})"
    )
    return ExitStatus.OK


def _list(settings: Settings) -> ExitStatus:
    registry = read_registry(settings.models_dir)
    print(f"models folder: {settings.models_dir}")
    for name, entry in CATALOGUE.items():
        marker = "*" if name == settings.model.name else " "
        record = registry.get(name)
        installed = (
            f"installed, SHA-256 {record.sha256[:16]}… ({record.trust})"
            if record
            else "not installed"
        )
        labels = sum(1 for label in entry.labels if label)
        print(
            f"{marker} {name:<28} {entry.architecture:<11} {entry.resolution:>3} px "
            f"{labels:>2} findings  {installed}"
        )
    print(
        "* = [model] name.  No SHA-256 is published for these files; the first verified "
        "install is recorded and every later load must match it."
    )
    return ExitStatus.OK


def run_debug_preprocess(settings: Settings, args: argparse.Namespace) -> ExitStatus:
    """``debug preprocess FILE --out OUT``."""
    return debug_preprocess(settings, Path(args.file), Path(args.out))


def debug_preprocess(settings: Settings, path: Path, out: Path) -> ExitStatus:
    """Write the model input of ``path`` (as the configured model sees it) to ``out``."""
    entry = CATALOGUE.get(settings.model.name)
    resolution = entry.resolution if entry else 224
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
