"""Export an installed torch model to ONNX with a matching card, parity checked.

``dicom-node models export NAME --format onnx --out FILE`` writes FILE (outputs ``scores``,
the logits, and ``features``, the last feature map, so onnxruntime gives the same CAM) and
FILE.toml, the card to import it with.  Only verified weights are exported: an untrained or
unverified network is not a model to move onto another runtime.  Parity: a seeded probe batch
of 8 through both runtimes; the largest probability difference is reported, and above 1e-4
nothing is left behind.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dicom_node.config.settings import Settings
from dicom_node.errors import ModelError
from dicom_node.inference.card import ModelCard, parse_card, thresholds_table
from dicom_node.inference.models import ModelBundle, load_bundle
from dicom_node.inference.preprocess import model_input
from dicom_node.inference.runtimes import TorchRuntime, onnx_runtime
from dicom_node.inference.toml_writer import render_card

PARITY_LIMIT = 1e-4
PROBE_BATCH = 8
OPSET = 17


@dataclass(frozen=True)
class Export:
    model: Path
    card: Path
    max_difference: float  # of probabilities, torch eager vs onnxruntime, on the probe batch
    heatmaps: bool


class _Exported(nn.Module):
    """The runtime's forward as one module: (logits, feature map)."""

    def __init__(self, runtime: TorchRuntime) -> None:
        super().__init__()
        self.runtime = runtime
        owner = getattr(runtime.features, "__self__", None)  # CamNetwork.feature_map
        if isinstance(owner, nn.Module):
            self.net = owner  # registered, so the graph keeps the parameters' names
        if isinstance(runtime.forward, nn.Module):
            self.whole = runtime.forward
        if isinstance(runtime.head, nn.Module):
            self.head = runtime.head

    def forward(self, x: torch.Tensor) -> Any:
        if self.runtime.head is None:
            return self.runtime.forward(x)
        features = self.runtime.features(x)
        if self.runtime.relu:
            features = torch.relu(features)
        return self.runtime.head(features.mean(dim=(2, 3))), features


def export_onnx(settings: Settings, name: str, out: Path) -> Export:
    """Export the installed model ``name``; ``ModelError`` on refusal or failed parity."""
    model = dataclasses.replace(
        settings.model, name=name, weights="", allow_untrained=False, device="cpu", fp16=False
    )
    bundle = load_bundle(dataclasses.replace(settings, model=model))
    if bundle.weights_status != "verified" or not isinstance(bundle.runtime, TorchRuntime):
        raise ModelError(f"{name}: only verified torch models are exported")
    if bundle.runtime.activation != "sigmoid":
        raise ModelError(f"{name}: only models whose output is logits are exported")
    card_path = out.with_name(out.name + ".toml")
    for path in (out, card_path):
        if path.exists():
            raise ModelError(f"{path} exists; export to a new path (nothing is overwritten)")
    try:
        card = write_onnx(bundle, out, card_path)
        difference = parity(bundle, out, card, settings.model.threads)
    except BaseException:
        out.unlink(missing_ok=True)
        card_path.unlink(missing_ok=True)
        raise
    if difference > PARITY_LIMIT:
        out.unlink(missing_ok=True)
        card_path.unlink(missing_ok=True)
        raise ModelError(
            f"{name}: ONNX probabilities differ from torch by {difference:.2e} "
            f"(limit {PARITY_LIMIT:.0e}); nothing written"
        )
    return Export(out, card_path, difference, card.heatmap.given)


def write_onnx(bundle: ModelBundle, out: Path, card_path: Path) -> ModelCard:
    """Export the bundle's torch runtime to ``out`` and its card to ``card_path`` (no parity
    check: :func:`export_onnx` does that)."""
    import onnx

    runtime = bundle.runtime
    assert isinstance(runtime, TorchRuntime)
    source = bundle.card
    probe = torch.zeros((1, source.channels, source.resolution, source.resolution))
    outputs = ["scores", "features"] if runtime.heatmaps else ["scores"]
    axes = {name: {0: "batch"} for name in ["image", *outputs]}
    with torch.no_grad():
        torch.onnx.export(
            _Exported(runtime).eval(),
            (probe,),
            str(out),
            input_names=["image"],
            output_names=outputs,
            dynamic_axes=axes,
            opset_version=OPSET,
            dynamo=False,
        )
    heatmap: dict[str, Any] = {}
    if runtime.heatmaps:
        graph = onnx.load(str(out))
        heatmap = {"features": "features", "weight": _weight_initializer(graph, runtime)}
        onnx.save(graph, str(out))
    text = render_card(_card_values(bundle, heatmap))
    card_path.write_text(text, encoding="utf-8")
    return parse_card(text, out.stem, card_path.name)


def _weight_initializer(graph: Any, runtime: TorchRuntime) -> str:
    """The initializer holding the head's weight (by value), added as ``cam.weight`` when the
    exporter folded it into something else."""
    from onnx import numpy_helper

    weight = runtime.head.weight.detach().float().cpu().numpy()
    for init in graph.graph.initializer:
        array = numpy_helper.to_array(init)
        if array.shape == weight.shape and np.array_equal(array, weight):
            return str(init.name)
    graph.graph.initializer.append(numpy_helper.from_array(weight, "cam.weight"))
    return "cam.weight"


def _card_values(bundle: ModelBundle, heatmap: dict[str, Any]) -> dict[str, Any]:
    card = bundle.card
    preprocessing: dict[str, Any] = {"recipe": card.preprocessing.recipe}
    if card.preprocessing.recipe == "mean-std":
        preprocessing |= {
            "mean": list(card.preprocessing.mean),
            "std": list(card.preprocessing.std),
        }
    values: dict[str, Any] = {
        "format": "onnx",
        "labels": list(card.labels),
        "version": card.version,
        "intended_use": card.intended_use,
        "source": (
            f"exported from {bundle.model_name} (weights sha256 {bundle.weights_sha256}, "
            f"card sha256 {card.card_sha256}) by dicom-node models export; {card.source}"
        ),
        "input": {"size": card.resolution, "channels": card.channels, "name": "image"},
        "preprocessing": preprocessing,
        "output": {"name": "scores", "activation": "sigmoid"},
        "thresholds": thresholds_table(card.labels, card.op_thresholds),
    }
    if heatmap:
        values["heatmap"] = heatmap
    return values


def parity(bundle: ModelBundle, out: Path, card: ModelCard, threads: int) -> float:
    """The largest probability difference between torch and onnxruntime on a seeded batch."""
    generator = np.random.default_rng(0)
    shape = (PROBE_BATCH, 1, card.resolution, card.resolution)
    probe = model_input(card, generator.uniform(-1024, 1024, shape).astype(np.float32))
    expected, _ = bundle.runtime.run(probe)
    exported = onnx_runtime(out, card, threads, "cpu")
    actual, _ = exported.run(probe)
    return float(np.max(np.abs(expected - actual)))
