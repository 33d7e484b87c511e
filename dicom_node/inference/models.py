"""Load the configured model once per worker: weights, device, thresholds, provenance.

Weights come from the registry (verified against the SHA-256 recorded at install), or from
``[model] weights``: a file whose hash is in the registry is verified; any other file loads
only with ``allow_unverified`` (as a plain state dict) and every output then says UNVERIFIED.
Without weights the worker refuses to start, except the demo (``allow_untrained``), whose
outputs all say UNTRAINED DEMO MODEL.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from dicom_node.config.settings import Settings
from dicom_node.errors import ModelError
from dicom_node.inference.catalogue import CatalogueEntry
from dicom_node.inference.networks import CamNetwork, as_cam_network, build_architecture, head_of
from dicom_node.inference.registry import (
    catalogue_entry,
    load_release_file,
    load_state_dict_file,
    read_registry,
)
from dicom_node.results import UNTRAINED_LABEL, UNVERIFIED_LABEL
from dicom_node.store import file_sha256


@dataclass
class ModelBundle:
    """Everything a worker needs to analyse images, and what every result must say about it."""

    entry: CatalogueEntry
    network: CamNetwork
    device: torch.device
    weights_sha256: str
    weights_status: str  # verified, unverified or untrained
    thresholds: tuple[float | None, ...]
    thresholds_source: str
    fp16: bool = False
    name: str = ""  # the site's name for the model ([models.NAME]); "" is the catalogue name
    thresholds_version: str = ""  # the site operating points in force ("": none)

    @property
    def model_name(self) -> str:
        """What results, jobs and commands call this model."""
        return self.name or self.entry.name

    @property
    def warning_label(self) -> str | None:
        """The words every output carries when the weights are not verified release weights."""
        return {"untrained": UNTRAINED_LABEL, "unverified": UNVERIFIED_LABEL}.get(
            self.weights_status
        )


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"[model] device = {name!r} but no CUDA device is available")
    return torch.device(name)


def load_bundles(settings: Settings) -> dict[str, ModelBundle]:
    """Every configured model (``Settings.model_specs``), by name, in configuration order;
    a model that cannot load stops the start with its name in the error."""
    bundles = {}
    specs = settings.model_specs
    for spec in specs:
        one = settings.for_model(spec)
        if len(specs) > 1:  # each model takes the [thresholds] of the findings it reports
            labels = set(catalogue_entry(spec.catalogue).labels)
            thresholds = tuple(item for item in one.thresholds if item[0] in labels)
            one = dataclasses.replace(one, thresholds=thresholds)
        try:
            bundle = load_bundle(one)
        except ModelError as exc:
            if len(specs) == 1 and spec.name == spec.catalogue:
                raise  # the one model: its error as before
            raise ModelError(f"model {spec.name}: {exc}") from None
        bundle.name = spec.name
        bundles[spec.name] = bundle
    return bundles


def load_bundle(settings: Settings) -> ModelBundle:
    """Load the configured model, or raise ModelError naming the command that fixes it."""
    entry = catalogue_entry(settings.model.name)
    network, sha256, status = _load_weights(settings, entry)
    device = resolve_device(settings.model.device)
    if settings.model.threads:
        torch.set_num_threads(settings.model.threads)
    fp16 = settings.model.fp16 and device.type == "cuda"
    cam = as_cam_network(entry, network, normalise_features=status == "untrained").to(device)
    if fp16:
        cam = cam.half()
    thresholds, source = _thresholds(entry, dict(settings.thresholds), status == "untrained")
    return ModelBundle(entry, cam, device, sha256, status, thresholds, source, fp16)


def _load_weights(settings: Settings, entry: CatalogueEntry) -> tuple[torch.nn.Module, str, str]:
    registry = read_registry(settings.models_dir)
    if settings.model.weights:
        path = Path(settings.model.weights)
        if not path.is_file():
            raise ModelError(f"[model] weights = {path} does not exist")
        digest = file_sha256(path)
        known = registry.get(entry.name)
        if known is not None and known.sha256 == digest:
            return load_release_file(path, entry), digest, "verified"
        if not settings.model.allow_unverified:
            raise ModelError(
                f"{path.name} (SHA-256 {digest[:16]}…) is not the registered "
                f"file for {entry.name}: run `dicom-node models import {path} --name "
                f"{entry.name}`, or set [model] allow_unverified = true"
            )
        return load_state_dict_file(path, entry), digest, "unverified"
    record = registry.get(entry.name)
    if record is not None:
        path = settings.models_dir / record.file
        if not path.is_file() or file_sha256(path) != record.sha256:
            raise ModelError(
                f"installed weights for {entry.name} are missing or do not match "
                f"their recorded SHA-256: run `dicom-node models verify`, then "
                f"`dicom-node models pull {entry.name}`"
            )
        return load_release_file(path, entry), record.sha256, "verified"
    if settings.model.allow_untrained:
        return untrained_network(entry), "0" * 64, "untrained"
    raise ModelError(
        f"no weights installed for {entry.name}: run `dicom-node models pull "
        f"{entry.name}` (or `dicom-node models import FILE --name {entry.name}` "
        "on a site without internet access)"
    )


def untrained_network(entry: CatalogueEntry, seed: int = 0) -> torch.nn.Module:
    """The demo's network: random weights (seeded, so every run gives the same numbers) and
    a head whose scores spread around 0.5 instead of saturating at 0 or 1 (and decided at
    0.5, see :func:`_thresholds`).

    Why the default head saturates: untrained batch norms (running mean 0, variance 1) are
    the identity and the convolutions have no bias, so the body scales with the image
    (features of ``a * x`` are ``a`` times those of ``x``); pooled features of a [-1024, 1024]
    image are in the hundreds, every logit is hundreds, and every image gets the same
    100.0 % / 0.0 % pattern.  The CAM wrapper therefore divides each image's feature map by
    its mean (``normalise_features``), and the head here has rows of zero sum and unit norm
    and no bias, so a logit is the weighted deviation of the image's channels from their
    mean: of order one, different for different images, and meaningless (UNTRAINED).
    """
    torch.manual_seed(seed)
    network = build_architecture(entry).eval()
    head = head_of(entry, network)
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(head.weight.shape, generator=generator)
    weight -= weight.mean(dim=1, keepdim=True)
    weight /= weight.norm(dim=1, keepdim=True)
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.zero_()
    return network


UNTRAINED_THRESHOLD = 0.5


def _thresholds(
    entry: CatalogueEntry, overrides: dict[str, float], untrained: bool = False
) -> tuple[tuple[float | None, ...], str]:
    """The decision threshold per output: torchxrayvision's operating points, which fit the
    released weights only, so the untrained demo network decides at its scores' centre, 0.5."""
    unknown = sorted(set(overrides) - {label for label in entry.labels if label})
    if unknown:
        raise ModelError(
            f"[thresholds] names findings {entry.name} does not report: {', '.join(unknown)}"
        )
    defaults = (UNTRAINED_THRESHOLD,) * len(entry.labels) if untrained else entry.op_thresholds
    thresholds = tuple(
        overrides.get(label, default) if label else None
        for label, default in zip(entry.labels, defaults, strict=True)
    )
    source = "untrained demo: 0.5 for every finding" if untrained else "torchxrayvision op_threshs"
    if overrides:
        source += f" with {len(overrides)} site override(s)"
    return thresholds, source
