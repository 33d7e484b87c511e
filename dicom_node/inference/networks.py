"""The catalogue's networks: build an architecture, and see it as feature map + linear head.

The only catalogue module that needs torch; :mod:`dicom_node.inference.catalogue` describes the
models without it.
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torchvision
import torchxrayvision as xrv
from torch import nn


class CamNetwork(nn.Module):
    """A classifier seen as feature map + linear head, the shape CAM needs.

    Both catalogue architectures end in global average pooling and one linear layer, so the
    class activation map of the same forward pass is exact (Zhou et al., CVPR 2016); no
    backward pass (Grad-CAM) is needed for them.
    """

    def __init__(
        self, body: nn.Module, head: nn.Linear, architecture: str, normalise_features: bool = False
    ) -> None:
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
        # nn.Module types submodule attributes as Tensor | Module; these are the known layers
        net: Any = self.body
        if self.architecture == "densenet121":
            return torch.relu(net.features(x))
        x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        return net.layer4(net.layer3(net.layer2(net.layer1(x))))


def build_architecture(architecture: str, outputs: int, channels: int = 1) -> nn.Module:
    """An untrained network with exactly the release file's parameter names and shapes
    (``channels``: 1 as TorchXRayVision trains; 3 for a site's ImageNet-style weights)."""
    if architecture == "densenet121":
        return xrv.models.DenseNet(num_classes=outputs, in_channels=channels)
    net = torchvision.models.resnet50(num_classes=outputs, weights=None)
    net.conv1 = nn.Conv2d(channels, 64, kernel_size=7, stride=2, padding=3, bias=False)  # as xrv
    return net


def head_of(architecture: str, module: nn.Module) -> nn.Linear:
    """The final linear layer (``classifier`` of xrv's DenseNet, ``fc`` of a ResNet)."""
    head = module.classifier if architecture == "densenet121" else module.fc
    return cast(nn.Linear, head)  # nn.Module types attributes as Tensor | Module


def as_cam_network(
    architecture: str, module: nn.Module, normalise_features: bool = False
) -> CamNetwork:
    """Wrap a loaded network for classification with CAM (``normalise_features``: the
    untrained demo network only)."""
    return CamNetwork(
        module, head_of(architecture, module), architecture, normalise_features
    ).eval()
