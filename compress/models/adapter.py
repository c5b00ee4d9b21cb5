"""The model I/O adapter: what a model takes, where its logits are, which modules are head and first layer.

Stages used to guess these (the last Conv/Linear is the head, the first one the input layer, the output
is the logits). A model source declares them instead (``declare``); ``adapter_of`` answers for every
model, from the declaration when there is one and otherwise by the old rule, so the trainer's head, the
layers pruning and QAT leave alone and ONNX export all get one answer.

Models whose inputs are several tensors (``input_ids`` + ``attention_mask``) or whose outputs are not a
tensor (a ``ModelOutput``, a tuple) are wrapped in ``IOModule``: it takes a dict (or keyword arguments)
and returns the logits tensor, so the trainer, the KD hook and the measures call every model alike.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn

from compress.errors import RecipeError

LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass
class ModelAdapter:
    """Declared facts about one model's interface (module names are as in ``model.named_modules()``)."""

    head: Optional[str] = None  # the classifier: left unpruned, kept in float by QAT, trained first when fine-tuning
    first_layer: Optional[str] = None  # the layer that sees the raw input (kept in float by binary/QAT keep_first_last)
    inputs: Optional[tuple[str, ...]] = None  # None: one tensor; else the names of a dict's tensors, in export order
    dynamic_axes: dict[str, dict[int, str]] = field(default_factory=dict)  # per input; default: axis 0 is the batch
    num_heads: dict[str, int] = field(default_factory=dict)  # q/k/v projection -> attention heads (torch-pruning)
    family: str = "compress"  # where the model comes from, for messages and reports
    decoder: Optional[Any] = None  # a causal LM's DecoderLayout (compress.models.decoder)


def declare(model: nn.Module, **facts: Any) -> nn.Module:
    """Attach a ``ModelAdapter`` to ``model`` (merged into an earlier declaration); returns the model."""
    old = model.__dict__.get("compress_adapter")
    model.compress_adapter = replace(old, **facts) if old is not None else ModelAdapter(**facts)
    return model


def _num_outputs(model: nn.Module) -> Optional[int]:
    io = getattr(model, "compress_io", None) or {}
    return io.get("num_outputs") or None


def infer_head(model: nn.Module, num_outputs: Optional[int] = None) -> Optional[str]:
    """The last Linear/Conv layer (with ``num_outputs`` outputs when given): right for torchvision
    classifiers (auxiliary heads come earlier in module order) and the built-in models."""
    last = match = None
    for name, m in model.named_modules():
        if isinstance(m, LAYERS):
            last = name
            out = m.out_features if isinstance(m, nn.Linear) else m.out_channels
            if num_outputs is None or out == num_outputs:
                match = name
    return match if match is not None else last


def adapter_of(model: nn.Module, num_outputs: Optional[int] = None) -> ModelAdapter:
    """The model's declared adapter; for undeclared models head and first layer by module order
    (the head: the last layer with ``num_outputs`` outputs, default the count the model was built for)."""
    declared = getattr(model, "compress_adapter", None)
    if declared is not None and declared.head and declared.first_layer:
        return declared
    names = [n for n, m in model.named_modules() if isinstance(m, LAYERS)]
    head, first = infer_head(model, num_outputs or _num_outputs(model)), names[0] if names else None
    if declared is not None:  # a partial declaration: the rest by module order
        return replace(declared, head=declared.head or head, first_layer=declared.first_layer or first)
    return ModelAdapter(head=head, first_layer=first)


def head_name(model: nn.Module, given: Optional[str] = None, path: str = "head", num_outputs: Optional[int] = None) -> str:
    """``given`` if the model has it, else the adapter's head; one-line error otherwise."""
    modules = dict(model.named_modules())
    if given is not None and given != "auto":
        if given not in modules:
            names = [n for n, m in model.named_modules() if n and any(True for _ in m.parameters(recurse=False))]
            raise RecipeError(path, f"no module '{given}' in the model; modules with parameters: {', '.join(names[-8:])}")
        return given
    head = adapter_of(model, num_outputs).head
    if head is None or head not in modules:
        raise RecipeError(path, f"{type(model).__name__} declares no head module{f' ({head!r} is not in it)' if head else ''}; "
                                "name the head module")
    return head


def logits_of(out: Any) -> torch.Tensor:
    """The logits in a model's output: the tensor itself, ``.logits`` (transformers), ``['logits']``, or
    the first element of a tuple (torchvision's aux-logit outputs)."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits") and isinstance(out.logits, torch.Tensor):
        return out.logits
    if isinstance(out, dict) and isinstance(out.get("logits"), torch.Tensor):
        return out["logits"]
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot find the logits in a model output of type {type(out).__name__}")


class IOModule(nn.Module):
    """Calls ``model`` with a dict of named inputs (or one tensor) and returns its logits tensor.

    ``inputs`` names the tensors a dict may hold: a dict for a model that takes one tensor, or a tensor
    for one that takes a dict, is refused in one line rather than failing deep inside the model.
    """

    def __init__(self, model: nn.Module, inputs: Optional[Sequence[str]] = None):
        super().__init__()
        self.model = model
        self.input_names = tuple(inputs) if inputs else None

    def forward(self, x: Any = None, **kwargs: Any) -> torch.Tensor:
        if isinstance(x, dict):
            kwargs = {**x, **kwargs}
            x = None
        if self.input_names is None:
            if x is None:
                raise TypeError("this model takes one input tensor, got named inputs "
                                f"({', '.join(kwargs)})")
            return logits_of(self.model(x, **kwargs))
        if x is not None:
            raise TypeError(f"this model takes named inputs ({', '.join(self.input_names)}), got one tensor")
        unknown = [k for k in kwargs if k not in self.input_names]
        if unknown:
            raise TypeError(f"unknown input {unknown[0]!r}; this model takes {', '.join(self.input_names)}")
        return logits_of(self.model(**kwargs))


def wrap_io(model: nn.Module, inputs: Optional[Sequence[str]] = None, **facts: Any) -> IOModule:
    """``model`` inside an ``IOModule``; the declared module names get the wrapper's ``model.`` prefix."""
    wrapped = IOModule(model, inputs)
    for key in ("head", "first_layer"):
        if facts.get(key):
            facts[key] = f"model.{facts[key]}"
    if facts.get("num_heads"):
        facts["num_heads"] = {f"model.{k}": v for k, v in facts["num_heads"].items()}
    if facts.get("decoder") is not None:
        facts["decoder"] = facts["decoder"].prefixed("model")
    return declare(wrapped, inputs=tuple(inputs) if inputs else None, **facts)


def attention_heads(model: nn.Module) -> dict[nn.Module, int]:
    """torch-pruning's ``num_heads``: each declared q/k/v projection module -> its head count."""
    modules = dict(model.named_modules())
    return {modules[n]: h for n, h in adapter_of(model).num_heads.items() if n in modules}


# -- input adaptation -------------------------------------------------------------------------------------
class InputAdapt:
    """Forward pre-hook that repeats/averages image channels and resizes images before the model sees them.

    A hook rather than a wrapper module, so the model's state_dict keys (and pretrained or saved weights)
    stay those of the model itself; ONNX export and tracing run it as part of the forward.
    """

    def __init__(self, channels: Optional[int] = None, size: Optional[Sequence[int]] = None):
        self.channels, self.size = channels, tuple(size) if size else None

    def __call__(self, module: nn.Module, args: tuple):
        if not args or not isinstance(args[0], torch.Tensor) or args[0].ndim != 4:
            return None
        x = args[0]
        c = x.shape[1]
        if self.channels and c != self.channels:
            if c == 1:
                x = x.expand(-1, self.channels, -1, -1)
            elif self.channels == 1:
                x = x.mean(1, keepdim=True)
            else:
                raise ValueError(f"cannot adapt {c} input channels to {self.channels} (only 1 -> n and n -> 1)")
        if self.size and tuple(x.shape[-2:]) != self.size:
            x = torch.nn.functional.interpolate(x, size=self.size, mode="bilinear", align_corners=False)
        return (x, *args[1:])


def adapt_input(model: nn.Module, channels: Optional[int] = None, size: Optional[Sequence[int]] = None) -> nn.Module:
    model.register_forward_pre_hook(InputAdapt(channels, size))
    return model


@torch.no_grad()
def set_in_chans(model: nn.Module, in_chans: int) -> nn.Module:
    """Rebuild the adapter's first layer (a Conv) for ``in_chans`` input channels.

    Pretrained filters are summed for one channel and tiled (scaled by 3 / in_chans) otherwise, as timm's
    ``adapt_input_conv`` does; hand-written because timm is an optional extra.
    """
    name = adapter_of(model).first_layer
    conv = model.get_submodule(name) if name else None
    if not isinstance(conv, nn.modules.conv._ConvNd) or conv.groups != 1:
        raise RecipeError("model.in_chans", f"the first layer ({name!r}) is not a plain convolution; use adapt_input")
    if conv.in_channels == in_chans:
        return model
    new = type(conv)(in_chans, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                     1, conv.bias is not None, conv.padding_mode)
    w = conv.weight
    if in_chans == 1:
        new.weight.copy_(w.sum(1, keepdim=True))
    else:
        reps = -(-in_chans // w.shape[1])
        new.weight.copy_(w.repeat(1, reps, *([1] * (w.ndim - 2)))[:, :in_chans] * (w.shape[1] / in_chans))
    if conv.bias is not None:
        new.bias.copy_(conv.bias)
    model.set_submodule(name, new)
    return model
