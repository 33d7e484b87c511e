"""The runtimes a model runs on: torch (eager or TorchScript) and onnxruntime.

Each runtime maps a batch of model inputs (N, C, R, R) float32 to the probabilities (N, K) and,
when the model has a CAM path, the class activation maps (N, K, h, w) of the same forward pass:
``sum_c W[k, c] * F[c]`` over the last feature map F (Zhou et al., CVPR 2016).  A model without
one gives ``None`` and its results say "no heatmap from this model".

Torch and onnxruntime are imported inside the functions that build a runtime, so importing this
module costs nothing; a runtime is built once per worker.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from dicom_node.errors import InferenceError, ModelError
from dicom_node.inference.card import HeatmapSpec, ModelCard

if TYPE_CHECKING:
    import torch

RUNTIMES = ("auto", "torch", "onnxruntime")
Scores = tuple[np.ndarray, np.ndarray | None]  # probabilities (N, K), CAMs (N, K, h, w) or None


def choose_runtime(requested: str, card: ModelCard) -> str:
    """``auto``: onnxruntime for ONNX files, torch for every other format."""
    wanted = requested or "auto"
    if wanted == "auto":
        return "onnxruntime" if card.format == "onnx" else "torch"
    if wanted == "onnxruntime" and card.format != "onnx":
        raise ModelError(
            f"[model] runtime = 'onnxruntime' but {card.name} is a {card.format} model: run "
            f"`dicom-node models export {card.name} --format onnx --out FILE`, import FILE "
            "with its card under a new name, and configure that name"
        )
    if wanted == "torch" and card.format == "onnx":
        raise ModelError(f"[model] runtime = 'torch' cannot run {card.name}, an ONNX model")
    return wanted


def _sigmoid(values: np.ndarray) -> np.ndarray:
    from scipy.special import expit  # no overflow warning for large logits

    return np.asarray(expit(values.astype(np.float64)), dtype=np.float32)


@dataclass
class TorchRuntime:
    """A torch model seen as feature map + linear head (``head`` None: a plain forward, no
    heatmap).  ``features``: the module or function giving the last feature map."""

    features: Any
    head: Any  # nn.Linear (or a scripted one): weight (K, C), bias (K,)
    device: torch.device
    fp16: bool = False
    forward: Any = None  # the whole model, when it has no CAM path
    activation: str = "sigmoid"
    relu: bool = False
    kind: str = "torch"

    @property
    def heatmaps(self) -> bool:
        return self.head is not None

    def run(self, inputs: np.ndarray) -> Scores:
        import torch

        try:
            with torch.inference_mode():
                batch = torch.from_numpy(inputs).to(self.device)
                if self.fp16:
                    batch = batch.half()
                if self.head is None:
                    out = self.forward(batch).float().cpu().numpy()
                    return (_sigmoid(out) if self.activation == "sigmoid" else out), None
                features = self.features(batch)
                if self.relu:
                    features = torch.relu(features)
                logits = self.head(features.mean(dim=(2, 3))).float().cpu().numpy()
                weight = self.head.weight.to(features.dtype)
                cams = torch.einsum("kc,nchw->nkhw", weight, features).float().cpu().numpy()
        except RuntimeError as exc:  # out of memory, device errors, a script's own failure
            raise InferenceError(f"model forward failed: {exc}") from exc
        probabilities = _sigmoid(logits) if self.activation == "sigmoid" else logits
        return probabilities, cams


@dataclass
class OnnxRuntime:
    """An ONNX model on onnxruntime; CAM from the card-named feature output and the
    classifier's initializers (``weight`` None: no heatmap)."""

    session: Any  # onnxruntime.InferenceSession
    input_name: str
    output_name: str
    features_name: str = ""
    weight: np.ndarray | None = None  # (K, C)
    relu: bool = False
    activation: str = "sigmoid"
    kind: str = "onnxruntime"

    @property
    def heatmaps(self) -> bool:
        return self.weight is not None

    def run(self, inputs: np.ndarray) -> Scores:
        names = [self.output_name] + ([self.features_name] if self.weight is not None else [])
        try:
            outputs = self.session.run(names, {self.input_name: inputs.astype(np.float32)})
        except Exception as exc:  # onnxruntime raises its own exception types
            raise InferenceError(f"model forward failed: {type(exc).__name__}: {exc}") from exc
        scores = np.asarray(outputs[0], dtype=np.float32)
        probabilities = _sigmoid(scores) if self.activation == "sigmoid" else scores
        if self.weight is None:
            return probabilities, None
        features = np.asarray(outputs[1], dtype=np.float32)
        if self.relu:
            features = np.maximum(features, 0.0)
        try:
            cams = np.einsum("kc,nchw->nkhw", self.weight, features).astype(np.float32)
        except ValueError as exc:  # a feature output that does not match the weight
            raise InferenceError(f"heatmap from the model's features failed: {exc}") from exc
        return probabilities, cams


def onnx_runtime(path: Any, card: ModelCard, threads: int, device: str) -> OnnxRuntime:
    """An onnxruntime session for an imported ONNX file (checked at import): CPU, or CUDA
    first when ``device`` allows it and the CUDA provider is present."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    providers: list[Any] = ["CPUExecutionProvider"]
    if device != "cpu" and "CUDAExecutionProvider" in ort.get_available_providers():
        index = int(device.split(":", 1)[1]) if ":" in device else 0  # cuda:N: that GPU
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": index}))
    try:
        session = ort.InferenceSession(str(path), options, providers=providers)
    except Exception as exc:
        raise ModelError(f"{card.name}: onnxruntime cannot open the model ({exc})") from None
    input_name = card.input_name or session.get_inputs()[0].name
    output_name = card.output_name or session.get_outputs()[0].name
    weight = onnx_heatmap_weight(path, card) if card.heatmap.given else None
    return OnnxRuntime(
        session,
        input_name,
        output_name,
        card.heatmap.features,
        weight,
        card.heatmap.relu,
        card.activation,
    )


def onnx_heatmap_weight(path: Any, card: ModelCard) -> np.ndarray:
    """The classifier weight (K, C) the card names, read from the graph's initializers (the
    file was checked at import and its SHA-256 just now)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    for init in model.graph.initializer:
        if init.name == card.heatmap.weight:
            weight = np.asarray(numpy_helper.to_array(init), dtype=np.float32)
            return weight.reshape(weight.shape[:2])  # (K, C), also of a 1x1 convolution head
    raise ModelError(f"{card.name}: heatmap.weight {card.heatmap.weight!r} is not an initializer")


def module_at(module: Any, dotted: str) -> Any:
    """The submodule at ``dotted`` (``features``, ``backbone.head``); ModelError naming it."""
    found = module
    for part in dotted.split("."):
        if not hasattr(found, part):
            raise ModelError(f"the model has no submodule {dotted!r} (heatmap spec)")
        found = getattr(found, part)
    return found


def script_runtime(
    module: Any, heatmap: HeatmapSpec, activation: str, device: torch.device
) -> TorchRuntime:
    """A TorchScript module: CAM from the card-named ``features`` and ``classifier``
    submodules, or a plain forward (no heatmap) when the card names none."""
    module = module.to(device).eval()
    if not heatmap.given:
        return TorchRuntime(None, None, device, forward=module, activation=activation)
    features = module_at(module, heatmap.features)
    head = module_at(module, heatmap.classifier)
    if not hasattr(head, "weight"):
        raise ModelError(f"heatmap.classifier {heatmap.classifier!r} has no weight")
    return TorchRuntime(features, head, device, activation=activation, relu=heatmap.relu)
