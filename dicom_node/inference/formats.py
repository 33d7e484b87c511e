"""Check and open a site's model file by the format its card names, never by its extension.

No format here executes code from the file, except TorchScript, which only opens when
``[model] allow_torchscript = true``: an ONNX file is a protobuf graph (parsed by ``onnx``,
run by onnxruntime), a safetensors file is a JSON header and raw tensors.  A pickle renamed
``.onnx`` or ``.safetensors`` is therefore refused as unreadable, and nothing of it runs.
A TorchScript archive holds code that the TorchScript interpreter runs (and may be crafted to
do more), so it is trusted like a program, not like data.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dicom_node.errors import ModelError
from dicom_node.inference.card import ModelCard

if TYPE_CHECKING:
    from torch import nn

TORCHSCRIPT_REFUSED = (
    "is a TorchScript archive, which holds code the TorchScript interpreter runs; it is "
    "refused unless [model] allow_torchscript = true (trust it like a program you install)"
)


def check_model_file(path: Path, card: ModelCard, allow_torchscript: bool) -> None:
    """Refuse a file that is not what its card says; ``ModelError`` with one line."""
    if card.format == "onnx":
        check_onnx(path, card)
    elif card.format == "safetensors":
        load_safetensors(path, card)
    elif card.format == "torchscript":
        check_torchscript(path, card, allow_torchscript)
    else:
        from dicom_node.inference.registry import load_release_file

        load_release_file(path, card.architecture, len(card.labels), card.channels)


def _onnx_model(path: Path) -> Any:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends: not an ONNX file
        raise ModelError(f"{path.name} is not an ONNX model ({type(exc).__name__})") from None
    external = [
        i.name for i in model.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL
    ]
    if external:  # tensors in other files: paths the node would read, and not installed
        raise ModelError(
            f"{path.name} keeps tensors in external files ({external[0]!r}, ...); save it as "
            "one file (onnx.save_model(model, path, save_as_external_data=False))"
        )
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{path.name} fails onnx.checker: {first}") from None
    return model


def _dims(value_info: Any) -> list[int | None]:
    """A graph value's shape, None for a symbolic dimension (the batch, say)."""
    shape = value_info.type.tensor_type.shape
    return [d.dim_value if d.HasField("dim_value") else None for d in shape.dim]


def check_onnx(path: Path, card: ModelCard) -> None:
    """``onnx.checker``, then the graph's input and outputs against the card."""
    model = _onnx_model(path)
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    inputs = {i.name: i for i in graph.input if i.name not in initializers}
    outputs = {o.name: o for o in graph.output}
    input_name = card.input_name or (next(iter(inputs)) if len(inputs) == 1 else "")
    if input_name not in inputs:
        raise ModelError(
            f"{path.name}: the card's input.name {card.input_name!r} is not a graph input "
            f"(inputs: {', '.join(inputs)})"
        )
    want = [None, card.channels, card.resolution, card.resolution]
    have = _dims(inputs[input_name])
    if len(have) != 4 or any(
        h is not None and w is not None and h != w for h, w in zip(have, want, strict=True)
    ):
        raise ModelError(
            f"{path.name}: input {input_name!r} has shape {have}, the card says "
            f"[N, {card.channels}, {card.resolution}, {card.resolution}]"
        )
    output_name = card.output_name or next(iter(outputs))
    if output_name not in outputs:
        raise ModelError(f"{path.name}: the card's output.name {output_name!r} is not an output")
    scores = _dims(outputs[output_name])
    if len(scores) != 2 or scores[1] not in (None, len(card.labels)):
        raise ModelError(
            f"{path.name}: output {output_name!r} has shape {scores}, the card lists "
            f"{len(card.labels)} labels"
        )
    if card.heatmap.given:
        _check_onnx_heatmap(path.name, card, outputs, initializers)


def _check_onnx_heatmap(name: str, card: ModelCard, outputs: Any, initializers: Any) -> None:
    from onnx import numpy_helper

    spec = card.heatmap
    if spec.features not in outputs:
        raise ModelError(f"{name}: heatmap.features {spec.features!r} is not a graph output")
    features = _dims(outputs[spec.features])
    if len(features) != 4:
        raise ModelError(f"{name}: heatmap.features {spec.features!r} is not (N, C, h, w)")
    for key in ("weight", "bias"):
        initializer = getattr(spec, key)
        if initializer and initializer not in initializers:
            raise ModelError(f"{name}: heatmap.{key} {initializer!r} is not an initializer")
    weight = numpy_helper.to_array(initializers[spec.weight])
    if weight.ndim == 4 and weight.shape[2:] == (1, 1):  # a 1x1 convolution head
        weight = weight.reshape(weight.shape[:2])
    channels = features[1]
    if (
        weight.ndim != 2
        or weight.shape[0] != len(card.labels)
        or (channels is not None and weight.shape[1] != channels)
    ):
        raise ModelError(
            f"{name}: heatmap.weight has shape {weight.shape}, not "
            f"({len(card.labels)}, {channels}) (labels, feature channels)"
        )


def load_safetensors(path: Path, card: ModelCard) -> nn.Module:
    """The state dict in the card's architecture, every key and shape checked."""
    from safetensors.torch import load_file

    from dicom_node.inference.registry import into_architecture

    try:
        state = load_file(str(path), device="cpu")
    except Exception as exc:  # SafetensorError, OSError: not a safetensors file
        raise ModelError(
            f"{path.name} is not a safetensors file ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:120] if str(exc) else ''})"
        ) from None
    return into_architecture(state, card.architecture, len(card.labels), card.channels, path.name)


def load_torchscript(path: Path, card: ModelCard, allow_torchscript: bool) -> Any:
    """The TorchScript module, only when allowed (it runs the archive's code)."""
    if not allow_torchscript:
        raise ModelError(f"{path.name} {TORCHSCRIPT_REFUSED}")
    import torch

    try:
        return torch.jit.load(str(path), map_location="cpu").eval()
    except Exception as exc:
        raise ModelError(
            f"{path.name} is not a TorchScript archive ({type(exc).__name__})"
        ) from None


def check_torchscript(path: Path, card: ModelCard, allow_torchscript: bool) -> None:
    """Load (when allowed) and run a seeded probe batch: one score per label, and a card's
    [heatmap] path must reproduce the archive's own forward (it replaces it in analysis)."""
    import torch

    from dicom_node.inference.card import HeatmapSpec
    from dicom_node.inference.preprocess import model_input
    from dicom_node.inference.runtimes import script_runtime

    module = load_torchscript(path, card, allow_torchscript)
    cpu = torch.device("cpu")
    shape = (2, 1, card.resolution, card.resolution)
    probe = model_input(card, np.random.default_rng(0).uniform(-1024, 1024, shape))
    try:
        forward, _ = script_runtime(module, HeatmapSpec(), card.activation, cpu).run(probe)
        scores, _ = script_runtime(module, card.heatmap, card.activation, cpu).run(probe)
    except Exception as exc:
        raise ModelError(f"{path.name}: a probe input fails ({type(exc).__name__})") from None
    if forward.shape != (2, len(card.labels)):
        raise ModelError(
            f"{path.name}: the output has shape {forward.shape[1:]}, the card lists "
            f"{len(card.labels)} labels"
        )
    if float(np.max(np.abs(forward - scores))) > 1e-4:
        raise ModelError(
            f"{path.name}: the card's [heatmap] submodules do not reproduce the model's output "
            "(check heatmap.features, heatmap.classifier and heatmap.relu)"
        )
