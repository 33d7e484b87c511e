"""The built-in catalogue of TorchXRayVision models and their architectures.

Labels, thresholds, resolutions and release URLs come from the pinned torchxrayvision
package (``xrv.models.model_urls``), so they cannot drift from the code that defines the
networks.  No SHA-256 or file size is published for the release files: those fields stay
``None`` and the registry records the hash of the first verified install (trust on first use).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torchvision
import torchxrayvision as xrv
from torch import nn

MODEL_NAMES = (
    "densenet121-res224-all", "densenet121-res224-nih", "densenet121-res224-pc",
    "densenet121-res224-chex", "densenet121-res224-rsna", "densenet121-res224-mimic_nb",
    "densenet121-res224-mimic_ch", "resnet50-res512-all",
)
DEFAULT_MODEL = "densenet121-res224-all"


@dataclass(frozen=True)
class CatalogueEntry:
    """What the node knows about one released model before any file is installed."""

    name: str
    architecture: str              # "densenet121" or "resnet50"
    labels: tuple[str, ...]        # "" where the model was not trained on that output
    resolution: int
    op_thresholds: tuple[float | None, ...]
    url: str
    published_size: int | None = None
    published_sha256: str | None = None

    @property
    def file_name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def version(self) -> str:
        """The release the file belongs to (from its URL), with the torchxrayvision version."""
        release = self.url.split("/download/", 1)[-1].split("/", 1)[0]
        return f"xrv-{xrv.__version__}/{release}"


def _entry(name: str) -> CatalogueEntry:
    info = xrv.models.model_urls[name]
    thresholds = tuple(None if t is None or math.isnan(float(t)) else float(t)
                       for t in info.get("op_threshs", [None] * len(info["labels"])))
    return CatalogueEntry(
        name=name, architecture=name.split("-", 1)[0], labels=tuple(info["labels"]),
        resolution=int(info.get("input_resolution", 224)), op_thresholds=thresholds,
        url=info["weights_url"])


CATALOGUE: dict[str, CatalogueEntry] = {name: _entry(name) for name in MODEL_NAMES}


class CamNetwork(nn.Module):
    """A classifier seen as feature map + linear head, the shape CAM needs.

    Both catalogue architectures end in global average pooling and one linear layer, so the
    class activation map of the same forward pass is exact (Zhou et al., CVPR 2016); no
    backward pass (Grad-CAM) is needed for them.
    """

    def __init__(self, body: nn.Module, head: nn.Linear, architecture: str,
                 normalise_features: bool = False) -> None:
        super().__init__()
        self.body, self.head, self.architecture = body, head, architecture
        self.normalise_features = normalise_features

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        features = self._features(x)
        if self.normalise_features:  # per image, mean 1: see untrained_network in models.py
            scale = features.mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
            features = features / scale
        return features

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        if self.architecture == "densenet121":
            return torch.relu(self.body.features(x))
        net = self.body
        x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        return net.layer4(net.layer3(net.layer2(net.layer1(x))))


def build_architecture(entry: CatalogueEntry) -> nn.Module:
    """An untrained network with exactly the release file's parameter names and shapes."""
    if entry.architecture == "densenet121":
        return xrv.models.DenseNet(num_classes=len(entry.labels))
    net = torchvision.models.resnet50(num_classes=len(entry.labels), weights=None)
    net.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)  # as xrv does
    return net


def head_of(entry: CatalogueEntry, module: nn.Module) -> nn.Linear:
    """The final linear layer (``classifier`` of xrv's DenseNet, ``fc`` of a ResNet)."""
    return module.classifier if entry.architecture == "densenet121" else module.fc


def as_cam_network(entry: CatalogueEntry, module: nn.Module,
                   normalise_features: bool = False) -> CamNetwork:
    """Wrap a loaded network for classification with CAM (``normalise_features``: the
    untrained demo network only)."""
    return CamNetwork(module, head_of(entry, module), entry.architecture,
                      normalise_features).eval()
