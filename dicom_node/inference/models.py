"""Load the configured model once per worker: card, weights, runtime, thresholds, provenance.

A catalogue model runs its TorchXRayVision architecture on torch; a site's model installed with
its card (:mod:`dicom_node.inference.byom`) runs on the runtime ``[model] runtime`` chooses.

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
from dicom_node.inference.card import ModelCard, model_card
from dicom_node.inference.catalogue import CATALOGUE, CatalogueEntry
from dicom_node.inference.formats import load_safetensors, load_torchscript
from dicom_node.inference.networks import as_cam_network, build_architecture, head_of
from dicom_node.inference.registry import (
    load_release_file,
    load_state_dict_file,
    read_registry,
    verify_record,
)
from dicom_node.inference.runtimes import (
    OnnxRuntime,
    TorchRuntime,
    choose_runtime,
    onnx_runtime,
    script_runtime,
)
from dicom_node.results import UNTRAINED_LABEL, UNVERIFIED_LABEL
from dicom_node.store import file_sha256

Runtime = TorchRuntime | OnnxRuntime


@dataclass
class ModelBundle:
    """Everything a worker needs to analyse images, and what every result must say about it."""

    card: ModelCard
    runtime: Runtime
    weights_sha256: str
    weights_status: str  # verified, unverified or untrained
    thresholds: tuple[float | None, ...]
    thresholds_source: str
    name: str = ""  # the site's name for the model ([models.NAME]); "" is the card's name
    thresholds_version: str = ""  # the site operating points in force ("": none)

    @property
    def model_name(self) -> str:
        """What results, jobs and commands call this model."""
        return self.name or self.card.name

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
        try:
            if len(specs) > 1:  # each model takes the [thresholds] of the findings it reports
                labels = set(model_card(spec.catalogue, settings.models_dir).labels)
                thresholds = tuple(item for item in one.thresholds if item[0] in labels)
                one = dataclasses.replace(one, thresholds=thresholds)
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
    card = model_card(settings.model.name, settings.models_dir)
    kind = choose_runtime(settings.model.runtime, card)
    if settings.model.threads:
        torch.set_num_threads(settings.model.threads)
    device = resolve_device(settings.model.device)
    if card.name in CATALOGUE:
        entry = CATALOGUE[card.name]
        network, sha256, status = _load_weights(settings, entry)
        untrained = status == "untrained"
        runtime: Runtime = _cam_runtime(entry.architecture, network, device, settings, untrained)
    else:
        if settings.model.weights:
            raise ModelError(
                f"[model] weights applies to catalogue models; {card.name} is installed "
                "with its card (`dicom-node models import FILE --card CARD.toml`)"
            )
        runtime, sha256 = _open_card_model(settings, card, kind, device)
        status, untrained = "verified", False
    thresholds, source = _thresholds(card, dict(settings.thresholds), untrained)
    return ModelBundle(card, runtime, sha256, status, thresholds, source)


def _cam_runtime(
    architecture: str,
    network: torch.nn.Module,
    device: torch.device,
    settings: Settings,
    untrained: bool = False,
    activation: str = "sigmoid",
) -> TorchRuntime:
    """A catalogue architecture's network as feature map + head (exact CAM, no backward)."""
    fp16 = settings.model.fp16 and device.type == "cuda"
    cam = as_cam_network(architecture, network, normalise_features=untrained).to(device)
    if fp16:
        cam = cam.half()
    return TorchRuntime(cam.feature_map, cam.head, device, fp16, activation=activation)


def _open_card_model(
    settings: Settings, card: ModelCard, kind: str, device: torch.device
) -> tuple[Runtime, str]:
    """A site model installed with its card: file and card re-checked, then opened."""
    models_dir = settings.models_dir
    record = read_registry(models_dir).get(card.name)
    if record is None or not record.card:
        raise ModelError(
            f"{card.name} has a card but no registry record: import it again with "
            f"`dicom-node models import FILE --card CARD.toml --name {card.name}`"
        )
    ok, message = verify_record(models_dir, record)
    if not ok:
        raise ModelError(f"{card.name}: {message}: run `dicom-node models verify`")
    path = models_dir / record.file
    if kind == "onnxruntime":
        return onnx_runtime(path, card, settings.model.threads, str(device)), record.sha256
    if card.format == "torchscript":
        module = load_torchscript(path, card, settings.model.allow_torchscript)
        return script_runtime(module, card.heatmap, card.activation, device), record.sha256
    if card.format == "safetensors":
        network = load_safetensors(path, card)
    else:
        network = load_release_file(path, card.architecture, len(card.labels), card.channels)
    runtime = _cam_runtime(card.architecture, network, device, settings, False, card.activation)
    return runtime, record.sha256


def _load_weights(settings: Settings, entry: CatalogueEntry) -> tuple[torch.nn.Module, str, str]:
    registry = read_registry(settings.models_dir)
    if settings.model.weights:
        path = Path(settings.model.weights)
        if not path.is_file():
            raise ModelError(f"[model] weights = {path} does not exist")
        digest = file_sha256(path)
        known = registry.get(entry.name)
        if known is not None and known.sha256 == digest:
            return _release(path, entry), digest, "verified"
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
        return _release(path, entry), record.sha256, "verified"
    if settings.model.allow_untrained:
        return untrained_network(entry), "0" * 64, "untrained"
    raise ModelError(
        f"no weights installed for {entry.name}: run `dicom-node models pull "
        f"{entry.name}` (or `dicom-node models import FILE --name {entry.name}` "
        "on a site without internet access)"
    )


def _release(path: Path, entry: CatalogueEntry) -> torch.nn.Module:
    return load_release_file(path, entry.architecture, len(entry.labels))


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
    network = build_architecture(entry.architecture, len(entry.labels)).eval()
    head = head_of(entry.architecture, network)
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
    card: ModelCard, overrides: dict[str, float], untrained: bool = False
) -> tuple[tuple[float | None, ...], str]:
    """The decision threshold per output: the card's operating points (torchxrayvision's for
    the catalogue), which fit the released weights only, so the untrained demo network decides
    at its scores' centre, 0.5."""
    unknown = sorted(set(overrides) - set(card.reported))
    if unknown:
        raise ModelError(
            f"[thresholds] names findings {card.name} does not report: {', '.join(unknown)}"
        )
    defaults = (UNTRAINED_THRESHOLD,) * len(card.labels) if untrained else card.op_thresholds
    thresholds = tuple(
        overrides.get(label, default) if label else None
        for label, default in zip(card.labels, defaults, strict=True)
    )
    if untrained:
        source = "untrained demo: 0.5 for every finding"
    elif card.name in CATALOGUE:
        source = "torchxrayvision op_threshs"
    else:
        source = "model card thresholds"
    if overrides:
        source += f" with {len(overrides)} site override(s)"
    return thresholds, source
