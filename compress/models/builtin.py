"""Built-in architectures: mlp, lenet5, smallcnn, and every torchvision classifier by name."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Literal, Optional

import torch
import torch.nn as nn
from pydantic import Field, ValidationInfo, field_validator

from compress.config import Width
from compress.models.adapter import adapter_of, set_in_chans
from compress.models.registry import MODELS, ModelSpec, register_model
from compress.registry import Entry, did_you_mean

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}
Activation = Literal["relu", "gelu", "tanh", "sigmoid"]


class MLPSpec(ModelSpec):
    hidden: list[Width] = Field(default_factory=lambda: [128])
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
    width: float = Field(1.0, gt=0, le=256)  # channel/unit multiplier: 4 gives the "4x wide" LeNet-5
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
    widths: list[Width] = Field(default_factory=lambda: [32, 64, 128], min_length=1)
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
    """Any ``torchvision.models`` classifier, its head sized to the data's class count.

    ``weights``: pretrained weights for everything but the head, either a torchvision weights name
    (``DEFAULT``, ``IMAGENET1K_V2`` or ``ResNet50_Weights.IMAGENET1K_V2``; downloaded once into the
    torch hub cache) or a local file (a torchvision ``.pth``, a plain state_dict or a compress
    checkpoint), always read with ``weights_only=True``. Heads whose class count differs are
    re-initialized. Models whose pretrained weights need other constructor arguments (inception_v3,
    googlenet: ``transform_input``) take them in ``kwargs``.
    """

    kwargs: dict = {}
    weights: Optional[str] = None
    in_chans: Optional[int] = Field(None, ge=1, le=64)  # rebuild the first conv for this many input channels

    @field_validator("weights")
    @classmethod
    def _weights(cls, w: Optional[str], info: ValidationInfo) -> Optional[str]:
        if w is None:
            return w
        if _is_path(w):
            if not Path(w).expanduser().is_file():
                raise ValueError(f"expected an existing weights file or a torchvision weights name, got '{w}' (no such file)")
            return w
        _weights_enum(info.data.get("name", "").rpartition(":")[2], w)  # raises ValueError naming the choices
        return w


_WEIGHT_FILES = (".pt", ".pth", ".bin", ".ckpt", ".tar")


def _is_path(w: str) -> bool:
    return "/" in w or "\\" in w or w.lower().endswith(_WEIGHT_FILES) or Path(w).expanduser().is_file()


def _weights_enum(model: str, w: str):
    """The torchvision weights member named ``w`` for ``model`` (ValueError listing the choices)."""
    from torchvision.models import get_model_weights, get_weight

    try:
        enum = get_model_weights(model)
    except (ValueError, KeyError):
        raise ValueError(f"torchvision has no pretrained weights for '{model}'; give a local weights file") from None
    choices = list(dict.fromkeys(["DEFAULT", *enum.__members__]))
    if "." in w:
        try:
            member = get_weight(w)
        except (ValueError, KeyError, AttributeError):
            member = None
        if member is None or type(member) is not enum:
            raise ValueError(f"unknown weights '{w}' for {model}; expected one of {', '.join(choices)} "
                             f"(or {enum.__name__}.<name>)")
        return member
    if w not in choices:
        raise ValueError(f"unknown weights '{w}' for {model}; expected one of {', '.join(choices)}{did_you_mean(w, choices)}")
    return enum[w]


def find_head(model: nn.Module, num_outputs: Optional[int] = None) -> str:
    """Name of the classifier head, as the model's adapter declares it (``compress.models.adapter``)."""
    head = adapter_of(model, num_outputs).head
    if head is None:
        raise ValueError(f"{type(model).__name__} has no Linear or Conv layer to use as the head")
    return head


def _skip_download(spec: TorchvisionSpec) -> bool:
    """While a recipe is only checked or a checkpoint loaded (``offline_reason``), torchvision's named weights
    that are not in torch.hub's cache are not fetched: the architecture is what a check needs, as for timm."""
    from compress.safety import offline_reason

    if _is_path(spec.weights) or not offline_reason():
        return False
    member = _weights_enum(spec.name, spec.weights)
    return not (Path(torch.hub.get_dir()) / "checkpoints" / Path(member.url).name).is_file()


def _read_state_dict(spec: TorchvisionSpec) -> tuple[dict, str]:
    """(state_dict, where it came from) for ``spec.weights``."""
    from compress.errors import CompressError

    w = spec.weights
    if _is_path(w):
        path = Path(w).expanduser()
        return read_weights_file(path), str(path)
    member = _weights_enum(spec.name, w)
    try:
        return member.get_state_dict(progress=True, weights_only=True), str(member)
    except Exception as exc:  # URLError, HTTPError, OSError, a truncated download...
        cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(member.url).name
        raise CompressError(f"weights '{w}': could not get {member} from {member.url} "
                            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); without internet, "
                            f"download that file elsewhere and put it at {cache}, or pass its path as weights") from None


def weights_error(path: str | Path, exc: BaseException):
    """One line for a weights file ``torch.load(weights_only=True)`` refused (``exc``): a pickle of other
    objects is named as such, since its own message is paragraphs of how to load it unsafely."""
    import pickle

    from compress.errors import CompressError

    if isinstance(exc, pickle.UnpicklingError):
        return CompressError(f"weights '{path}': not a loadable weights file: not weights-only (it pickles Python "
                             "objects besides tensors, which compress never unpickles)")
    detail = (str(exc).strip().splitlines() or [""])[0]
    return CompressError(f"weights '{path}': not a loadable weights file ({type(exc).__name__}: {detail})")


def read_weights_file(path: Path) -> dict:
    """A state_dict from a local file (plain, a compress checkpoint or a common training wrapper)."""
    from compress.errors import CompressError

    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or unsafe files
        raise weights_error(path, exc) from None
    for key in ("state_dict", "model"):  # compress checkpoints and common training wrappers
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise CompressError(f"weights '{path}': expected a state_dict, got {type(sd).__name__}")
    return sd


def load_pretrained(model: nn.Module, sd: dict, num_outputs: int, source: str = "weights") -> list[str]:
    """Load ``sd`` into ``model`` except head tensors whose class count differs; return the skipped keys."""
    from compress.errors import CompressError

    own = model.state_dict()
    heads = {name for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))
             and (m.out_features if isinstance(m, nn.Linear) else m.out_channels) == num_outputs}
    keep, skipped = {}, []
    for k, v in sd.items():
        if k in own and own[k].shape != v.shape:
            if k.rpartition(".")[0] in heads:
                skipped.append(k)
                continue
            raise CompressError(f"{source}: weights do not fit the model: '{k}' has shape {tuple(v.shape)}, "
                                f"the model's has {tuple(own[k].shape)}")
        keep[k] = v
    missing, unexpected = model.load_state_dict(keep, strict=False)
    missing = [k for k in missing if k not in skipped]
    if missing or unexpected:
        parts = [f"missing {', '.join(missing[:3])}" if missing else "", f"unexpected {', '.join(unexpected[:3])}" if unexpected else ""]
        raise CompressError(f"{source}: weights do not fit the model: {'; '.join(p for p in parts if p)}")
    return skipped


def _torchvision_model(spec: TorchvisionSpec, input_shape, num_outputs) -> nn.Module:
    import torchvision

    # Built without weights at the data's class count, so a checkpoint rebuilds the same structure.
    model = torchvision.models.get_model(spec.name, weights=None, num_classes=num_outputs, **spec.kwargs)
    if spec.weights is not None and not _skip_download(spec):
        sd, source = _read_state_dict(spec)
        load_pretrained(model, sd, num_outputs, source)
    if spec.in_chans is not None:
        set_in_chans(model, spec.in_chans)
    return model


def _torchvision_fallback(name: str):
    import torchvision

    if name in torchvision.models.list_models(module=torchvision.models):
        return Entry(name, _torchvision_model, TorchvisionSpec, "torchvision classifier")
    return None


MODELS.set_fallback(_torchvision_fallback)
