"""Built-in architectures: mlp, lenet5, smallcnn, and every torchvision classifier by name."""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn as nn
from pydantic import Field

from compress.models.registry import MODELS, ModelSpec, register_model
from compress.registry import Entry

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}
Activation = Literal["relu", "gelu", "tanh", "sigmoid"]


class MLPSpec(ModelSpec):
    hidden: list[int] = Field(default_factory=lambda: [128])
    activation: Activation = "relu"
    dropout: float = Field(0.0, ge=0, lt=1)
    input_dropout: float = Field(0.0, ge=0, lt=1)


@register_model("mlp", config=MLPSpec, description="fully connected network; hidden widths given (Hinton's 2x1200 is [1200, 1200])")
def mlp(spec: MLPSpec, input_shape, num_outputs) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    if spec.input_dropout:
        layers.append(nn.Dropout(spec.input_dropout))
    width = math.prod(input_shape)
    for h in spec.hidden:
        layers += [nn.Linear(width, h), ACTIVATIONS[spec.activation]()]
        if spec.dropout:
            layers.append(nn.Dropout(spec.dropout))
        width = h
    layers.append(nn.Linear(width, num_outputs))
    return nn.Sequential(*layers)


def _flat_size(features: nn.Module, input_shape) -> int:
    with torch.no_grad():
        return features(torch.zeros(1, *input_shape)).flatten(1).shape[1]


class LeNet5Spec(ModelSpec):
    width: float = Field(1.0, gt=0)  # channel/unit multiplier: 4 gives the "4x wide" LeNet-5
    activation: Activation = "relu"


class LeNet5(nn.Module):
    """LeNet-5 (LeCun 1998) for any input channels and size: conv 6, conv 16, fc 120, fc 84."""

    def __init__(self, in_channels: int, image_size: tuple, num_outputs: int, width: float = 1.0, act: str = "relu"):
        super().__init__()
        c1, c2, f1, f2 = (max(1, round(v * width)) for v in (6, 16, 120, 84))
        pad = 2 if min(image_size) < 32 else 0
        A = ACTIVATIONS[act]
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 5, padding=pad), A(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 5, padding=pad if min(image_size) < 16 else 0), A(), nn.MaxPool2d(2),
        )
        flat = _flat_size(self.features, (in_channels, *image_size))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(flat, f1), A(), nn.Linear(f1, f2), A(),
                                        nn.Linear(f2, num_outputs))

    def forward(self, x):
        return self.classifier(self.features(x))


def _image_shape(input_shape) -> tuple[int, tuple[int, int]]:
    if len(input_shape) == 2:
        return 1, tuple(input_shape)
    if len(input_shape) != 3:
        raise ValueError(f"expected image inputs (C, H, W), got shape {tuple(input_shape)}")
    return input_shape[0], tuple(input_shape[1:])


@register_model("lenet5", config=LeNet5Spec, description="LeNet-5 adapted to the input's channels and size; width multiplier")
def lenet5(spec: LeNet5Spec, input_shape, num_outputs) -> nn.Module:
    c, hw = _image_shape(input_shape)
    return LeNet5(c, hw, num_outputs, spec.width, spec.activation)


class SmallCNNSpec(ModelSpec):
    widths: list[int] = Field(default_factory=lambda: [32, 64, 128], min_length=1)
    dropout: float = Field(0.0, ge=0, lt=1)


class SmallCNN(nn.Module):
    """Conv-BN-ReLU blocks, each followed by 2x2 max-pool while the map is larger than 4x4; global pooling head."""

    def __init__(self, in_channels: int, image_size: tuple, num_outputs: int, widths: list[int], dropout: float = 0.0):
        super().__init__()
        blocks, c, size = [], in_channels, min(image_size)
        for w in widths:
            blocks += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            if size >= 8:
                blocks.append(nn.MaxPool2d(2))
                size //= 2
            c = w
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.classifier = nn.Linear(c, num_outputs)

    def forward(self, x):
        return self.classifier(self.dropout(self.pool(self.features(x)).flatten(1)))


@register_model("smallcnn", config=SmallCNNSpec, description="conv-bn-relu blocks with configurable widths and a pooled linear head")
def smallcnn(spec: SmallCNNSpec, input_shape, num_outputs) -> nn.Module:
    c, hw = _image_shape(input_shape)
    return SmallCNN(c, hw, num_outputs, spec.widths, spec.dropout)


class TorchvisionSpec(ModelSpec):
    """Any ``torchvision.models`` classifier, built with num_classes set to the data's class count."""

    kwargs: dict = {}


def _torchvision_model(spec: TorchvisionSpec, input_shape, num_outputs) -> nn.Module:
    import torchvision

    return torchvision.models.get_model(spec.name, weights=None, num_classes=num_outputs, **spec.kwargs)


def _torchvision_fallback(name: str):
    import torchvision

    if name in torchvision.models.list_models(module=torchvision.models):
        return Entry(name, _torchvision_model, TorchvisionSpec, "torchvision classifier")
    return None


MODELS.set_fallback(_torchvision_fallback)
