"""small_resnet: a ResNet-style CNN (He et al. 2016, CIFAR variant) sized for MNIST-like inputs.

torchvision's ResNets assume 224x224 inputs (7x7 stride-2 stem plus max-pool), which leaves a 1x1 map
from a 28x28 digit; this keeps the basic blocks and residual coupling (what structured pruning must
respect) with a 3x3 stem and one stage per width.
"""
from __future__ import annotations

import torch.nn as nn
from pydantic import Field

from compress.config import Width
from compress.models.builtin import _image_shape
from compress.models.registry import ModelSpec, register_model


class SmallResNetSpec(ModelSpec):
    widths: list[Width] = Field(default_factory=lambda: [16, 32, 64], min_length=1)  # channels per stage
    blocks: int = Field(1, ge=1, le=1024)  # basic blocks per stage
    stem_stride: int = Field(2, ge=1, le=2)  # 2: a 28x28 digit runs at 14x14 (4x fewer MACs)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class SmallResNet(nn.Module):
    def __init__(self, in_channels: int, num_outputs: int, widths: list[int], blocks: int = 1, stem_stride: int = 2):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, stem_stride, 1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        layers, c = [], widths[0]
        for i, w in enumerate(widths):
            for j in range(blocks):
                layers.append(BasicBlock(c, w, 2 if (i > 0 and j == 0) else 1))
                c = w
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_outputs)

    def forward(self, x):
        return self.fc(self.pool(self.layers(self.stem(x))).flatten(1))


@register_model("small_resnet", config=SmallResNetSpec,
                description="ResNet-style CNN for small images: 3x3 stem, basic residual blocks per width, pooled head")
def small_resnet(spec: SmallResNetSpec, input_shape, num_outputs) -> nn.Module:
    c, _ = _image_shape(input_shape)
    return SmallResNet(c, num_outputs, spec.widths, spec.blocks, spec.stem_stride)
