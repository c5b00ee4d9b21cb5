"""Quantized layers (k-bit and binary) that wrap nn.Conv*/nn.Linear, BN folding, packing, reload.

One wrapper, ``QuantLayer``, serves QAT, weight-only rounding and binary nets: while training it
keeps the float ("latent") weight and fake-quantizes it; ``pack()`` replaces the float weight by
``weight_packed`` (uint8, k bits per code) + ``weight_scale`` so the saved checkpoint really
shrinks; a packed layer unpacks on the fly to run. Checkpoints replay the wrapping through the
``qat`` / ``weight_only`` / ``binary`` transforms. ``prepare`` / ``convert``: the quantize stage's QAT
around a training loop of your own.
"""
from __future__ import annotations

import math
import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from compress.checkpoint import TRANSFORMS
from compress.checkpoint_io import record_transform
from compress.data.inputs import to_device
from compress.errors import RecipeError
from compress.quant.binary import binarize_weight, binary_activation, channel_scale
from compress.quant.fake_quant import ActQuant, WeightQuant, dequantize, fake_quant_weight, qrange
from compress.quant.packing import pack, unpack
from compress.trainer import Hook

QUANTIZABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


class QuantLayer(nn.Module):
    """A Conv/Linear with quantized weights and, optionally, quantized inputs and outputs.

    ``spec`` (plain data, stored in the checkpoint): kind 'int' or 'binary'; bits; act_bits (0 =
    float inputs); act_mode 'ema'|'lsq'; learned_scale; out_quant; binary 'binaryconnect'|'xnor';
    scale_mode 'none'|'layer'|'channel'; group_size (int: one scale per ``group_size`` consecutive input
    weights of an output row instead of one per row, as int4 LLM weights are stored).

    Groups reuse the per-row code unchanged: a ``[out, in]`` weight seen as ``[out * in / g, g]`` has one
    row per group, so the per-channel scale of that view is the group-wise scale (row-major: a row's
    groups are consecutive).
    """

    def __init__(self, inner: nn.Module, spec: dict):
        super().__init__()
        self.inner, self.spec = inner, dict(spec)
        self.kind, self.bits = spec["kind"], int(spec["bits"])
        act_bits, mode, mom = int(spec.get("act_bits", 0)), spec.get("act_mode", "ema"), spec.get("momentum", 0.01)
        self.in_q = ActQuant(act_bits, mode, mom) if act_bits else None
        self.out_q = ActQuant(act_bits, mode, mom) if act_bits and spec.get("out_quant") else None
        # range_bits < bits: codes on a narrower grid stored in ``bits`` (7-bit-range int8 for portable int8 files)
        self.group = int(spec.get("group_size") or 0)
        if self.group and inner.weight.shape[-1] % self.group:
            raise ValueError(f"group_size {self.group} does not divide the {inner.weight.shape[-1]} inputs of a layer")
        self.wq = WeightQuant(self._grouped(inner.weight), int(spec.get("range_bits", self.bits)),
                              spec.get("learned_scale", False)) if self.kind == "int" else None
        self.weight_shape = tuple(inner.weight.shape)
        self.packed = False
        self.export_weight: torch.Tensor | None = None  # set only while exporting to ONNX
        # Unpacked weight, kept so inference and ONNX tracing do not redo the bit unpacking each call.
        self._w_cache: torch.Tensor | None = None
        self._w_key: tuple | None = None
        self.register_load_state_dict_post_hook(lambda module, _: module._refresh_cache() if module.packed else None)

    # Model code reads its layers' attributes (transformers' ViT: ``projection.weight.dtype`` before the
    # forward): the wrapper answers for the layer it replaces. The weight is the one the layer computes with.
    @property
    def weight(self) -> torch.Tensor:
        return self.inner.weight if self.inner.weight is not None else self.quantized_weight()

    @property
    def bias(self):
        return self.inner.bias

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            # __dict__, not self._modules: while unpickling/copying that may not exist yet (no recursion)
            inner = None if name.startswith("_") else self.__dict__.get("_modules", {}).get("inner")
            if inner is None or not hasattr(inner, name):
                raise
            return getattr(inner, name)  # in_features, kernel_size, padding...

    def extra_repr(self) -> str:
        extra = f", {self.spec.get('binary')}" if self.kind == "binary" else ""
        return f"kind={self.kind}, bits={self.bits}{extra}, packed={self.packed}"

    # -- weights -------------------------------------------------------------------------------
    def _grouped(self, w: torch.Tensor) -> torch.Tensor:
        """The weight as one row per scale: itself, or ``[out * in / group, group]``."""
        return w.reshape(-1, self.group) if getattr(self, "group", 0) else w

    def unpacked_weight(self) -> torch.Tensor:
        codes = unpack(self.weight_packed, self.bits, math.prod(self.weight_shape)).view(self.weight_shape)
        if self.kind == "binary":
            shape = [-1] + [1] * (len(self.weight_shape) - 1)
            return (codes * 2 - 1).float() * self.weight_scale.view(shape)
        qmin, _ = qrange(self.bits, signed=True)
        return dequantize(self._grouped(codes) + qmin, self.weight_scale, 0, axis=0).view(self.weight_shape)

    def _cache_key(self) -> tuple:
        return (self.weight_packed.data_ptr(), self.weight_packed._version, self.weight_scale._version)

    @torch.no_grad()
    def _refresh_cache(self) -> None:
        self._w_cache = self.unpacked_weight()
        self._w_key = self._cache_key()

    def quantized_weight(self) -> torch.Tensor:
        if self.export_weight is not None:  # a constant in the ONNX graph; 8-bit gets Q/DQ nodes
            if self.kind == "int" and self.bits == 8:
                return fake_quant_weight(self.export_weight, self.weight_scale, 8)
            return self.export_weight
        if self.packed:
            if self._w_key != self._cache_key():
                self._refresh_cache()
            return self._w_cache
        w = self.inner.weight
        if self.kind == "int":
            return self.wq(self._grouped(w)).view_as(w)
        return binarize_weight(w, self.spec.get("scale_mode", "channel"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_q is not None:
            x = self.in_q(x)
        if self.kind == "binary" and self.spec.get("binary") == "xnor":
            x = binary_activation(x)
        w = self.quantized_weight()
        if isinstance(self.inner, nn.Linear):
            y = F.linear(x, w, self.inner.bias)
        else:
            y = self.inner._conv_forward(x, w, self.inner.bias)
        return self.out_q(y) if self.out_q is not None else y

    def stored_tensors(self) -> list[torch.Tensor]:
        """Weights kept outside the parameters (packed codes): ``compress.measure`` counts them as parameters."""
        return [self.weight_packed] if self.packed else []

    # -- packing -------------------------------------------------------------------------------
    @torch.no_grad()
    def codes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(unsigned codes, per-channel scale) of the current float weight."""
        w = self.inner.weight.detach()
        if self.kind == "binary":
            return (w >= 0).to(torch.int32), channel_scale(w, self.spec.get("scale_mode", "channel")).float()
        q, scale = self.wq.codes(self._grouped(w))
        return q.view_as(w) - qrange(self.bits, signed=True)[0], scale.float()

    @torch.no_grad()
    def round_weight(self) -> None:
        """Snap the float weight onto the quantization grid (the 'round' of round-then-fine-tune)."""
        codes, scale = self.codes()
        self.inner.weight.copy_(self._decode(codes, scale))

    def _decode(self, codes, scale):
        shape = [-1] + [1] * (codes.ndim - 1)
        if self.kind == "binary":
            return (codes * 2 - 1).float() * scale.view(shape)
        return dequantize(self._grouped(codes) + qrange(self.bits, signed=True)[0], scale, 0, axis=0).view(codes.shape)

    @torch.no_grad()
    def pack(self) -> None:
        codes, scale = self.codes()
        self._make_packed(pack(codes, self.bits), scale)

    def _make_packed(self, packed: torch.Tensor, scale: torch.Tensor) -> None:
        self.register_buffer("weight_packed", packed)
        self.register_buffer("weight_scale", scale)
        self.inner.register_parameter("weight", None)
        self.wq = None
        self.packed = True
        self._refresh_cache()


def quantizable_names(model: nn.Module, keep_first_last: bool, exclude: Iterable[str] = ()) -> list[str]:
    """Conv/Linear layers to wrap; ``keep_first_last`` leaves the adapter's first layer and head in float."""
    from compress.models.adapter import adapter_of

    names = [n for n, m in model.named_modules() if isinstance(m, QUANTIZABLE)]
    exclude = set(exclude)
    if keep_first_last and len(names) > 2:
        a = adapter_of(model)
        exclude |= {n for n in (a.first_layer, a.head) if n}
    return [n for n in names if n not in exclude]


def wrap(model: nn.Module, layers: dict[str, dict]) -> nn.Module:
    for name, spec in layers.items():
        model.set_submodule(name, QuantLayer(model.get_submodule(name), spec))
    return model


def quant_layers(model: nn.Module) -> list[QuantLayer]:
    return [m for m in model.modules() if isinstance(m, QuantLayer)]


def pack_model(model: nn.Module) -> None:
    for m in quant_layers(model):
        if not m.packed:
            m.pack()


# -- batch-norm folding ---------------------------------------------------------------------------
def _bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """Conv followed by BatchNorm (or Linear by BatchNorm1d) inside nn.Sequential containers."""
    pairs = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Sequential):
            continue
        kids = list(mod.named_children())
        for (n1, m1), (n2, m2) in zip(kids, kids[1:]):
            conv_bn = isinstance(m1, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and isinstance(m2, nn.modules.batchnorm._BatchNorm)
            lin_bn = isinstance(m1, nn.Linear) and isinstance(m2, nn.BatchNorm1d)
            if (conv_bn or lin_bn) and m2.track_running_stats:
                pre = f"{name}." if name else ""
                pairs.append((pre + n1, pre + n2))
    return pairs


def fold_batchnorm(model: nn.Module) -> list[list[str]]:
    """Fold BN into the preceding layer with torch's own fusion helpers; BN becomes Identity."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

    pairs = _bn_pairs(model)
    for layer_name, bn_name in pairs:
        layer, bn = model.get_submodule(layer_name), model.get_submodule(bn_name)
        was = layer.training
        fuse = fuse_linear_bn_eval if isinstance(layer, nn.Linear) else fuse_conv_bn_eval
        fused = fuse(layer.eval(), bn.eval())
        fused.train(was)
        model.set_submodule(layer_name, fused)
        model.set_submodule(bn_name, nn.Identity())
    return [list(p) for p in pairs]


@TRANSFORMS.register("fold_bn")
def _replay_fold_bn(model: nn.Module, params: dict, state_dict: dict) -> nn.Module:
    for layer_name, bn_name in params["pairs"]:
        layer = model.get_submodule(layer_name)
        if layer.bias is None:
            layer.bias = nn.Parameter(torch.zeros(layer.weight.shape[0]))
        model.set_submodule(bn_name, nn.Identity())
    return model


def _replay_quant(model: nn.Module, params: dict, state_dict: dict) -> nn.Module:
    wrap(model, params["layers"])
    for name in params["layers"]:
        layer = model.get_submodule(name)
        key = f"{name}.weight_packed"
        if key in state_dict:
            layer._make_packed(torch.empty_like(state_dict[key]), torch.empty_like(state_dict[f"{name}.weight_scale"]))
    return model


for _kind in ("qat", "weight_only", "binary"):
    TRANSFORMS.register(_kind)(_replay_quant)


# -- training hooks --------------------------------------------------------------------------
class ClipLatentWeights(Hook):
    """BinaryConnect keeps the real-valued weights in [-1, 1] after every update."""

    def __init__(self, model: nn.Module):
        self.layers = [m for m in quant_layers(model) if m.kind == "binary"]

    @torch.no_grad()
    def after_step(self, trainer) -> None:
        for m in self.layers:
            if m.inner.weight is not None:
                m.inner.weight.clamp_(-1, 1)


@torch.no_grad()
def calibrate(model: nn.Module, loader, batches: int) -> None:
    """Initialise activation ranges (EMA min/max, LSQ steps) on a few batches before training."""
    was = model.training
    model.train()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    for i, raw in enumerate(loader):
        if i >= batches:
            break
        model(to_device(raw[0], device))
    model.train(was)


@contextmanager
def exporting(model: nn.Module):
    """Freeze each quantized layer's weight as a constant for tracing (8-bit ones get Q/DQ nodes)."""
    layers = quant_layers(model)
    added = []
    try:
        for m in layers:
            with torch.no_grad():
                if m.packed:
                    m.export_weight = m.unpacked_weight().detach()
                elif m.kind == "int":
                    codes, scale = m.codes()
                    m.register_buffer("weight_scale", scale, persistent=False)
                    added.append(m)
                    m.export_weight = m._decode(codes, scale)
                else:
                    m.export_weight = binarize_weight(m.inner.weight, m.spec.get("scale_mode", "channel")).detach()
        yield model
    finally:
        for m in layers:
            m.export_weight = None
        for m in added:
            del m.weight_scale


def export_qdq(model: nn.Module, example: torch.Tensor, path, opset: int = 17, weight_type: str = "int8",
               dynamic_batch: bool = True):
    """A QAT model as ONNX with QuantizeLinear/DequantizeLinear (ORT fuses them to int8 kernels), weights
    stored as int8 codes; ``weight_type="uint8"`` stores them as uint8 (U8U8 kernels, the same numbers)."""
    from compress.runtime.onnx import to_onnx
    from compress.quant.int8 import fold_weights, to_uint8_weights

    with exporting(model), torch.no_grad():
        out = to_onnx(model.cpu(), example, path, opset, dynamic_batch)
    return to_uint8_weights(out) if weight_type == "uint8" else fold_weights(out)



# -- QAT in your own loop (torchao's pattern): prepare, train as usual, convert ------------------------------
# The quantize stage's QAT runs prepare_layers and pack_layers around its own trainer (quantize_layers in
# compress/quant/methods/torch_side.py); prepare() and convert() run them around yours, so the file is the one a
# recipe writes:
#
#     model = qat.prepare(model, QuantizeConfig(method="qat", bits=8), calibration=train_loader)
#     ...                                                  # your loop trains the fake-quantized model
#     qat.convert(model, example_inputs=x, path="model_qat_int8.onnx")

def sizes(model: nn.Module) -> dict:
    """Bytes of the weights of the quantized layers as stored, against the same weights in fp32."""
    stored = fp32 = 0
    for m in quant_layers(model):
        n = 1
        for d in m.weight_shape:
            n *= d
        fp32 += 4 * n
        stored += m.weight_packed.numel() + 4 * m.weight_scale.numel() if m.packed else 4 * n
    for name, p in model.named_parameters():  # layers left in float (first/last, excluded)
        if name.endswith("weight") and p.ndim > 1:
            fp32 += 4 * p.numel()
            stored += 4 * p.numel()
    return {"weight_bytes": stored, "fp32_weight_bytes": fp32, "weight_compression": round(fp32 / max(stored, 1), 2)}


def layer_names(model: nn.Module, cfg, keep_first_last: bool, path: str) -> list[str]:
    """The layers a PyTorch-side method quantizes: a decoder LM's projections (plus its head with
    ``lm_head: true``; ``compress.quant.gptq.decoder_linears``), else every Conv/Linear but the excluded
    (and the first/last ones when kept)."""
    from compress.quant.gptq import decoder_linears

    names = decoder_linears(model, cfg.exclude)
    if names is None:
        names = quantizable_names(model, keep_first_last, cfg.exclude)
    elif getattr(cfg, "lm_head", False):
        from compress.models.decoder import decoder_layout

        names.append(decoder_layout(model).lm_head)
    group = getattr(cfg, "group_size", None)
    if group:
        for n in names:
            width = model.get_submodule(n).weight.shape[-1]
            if width % group:
                raise RecipeError(f"{path}.group_size", f"{group} does not divide the {width} inputs of layer {n}; "
                                                        "pick a divisor or leave the layer out (exclude)")
    return names


def prepare_layers(model: nn.Module, cfg, spec: dict, path: str, *, keep_first_last: bool = False,
                   calibration=None, calibrate_batches: int = 0) -> tuple[dict, dict]:
    """Fold BatchNorm, wrap the Conv/Linear layers in ``QuantLayer``s, calibrate activation ranges on
    ``calibration`` (batches of a loader); (the wrapped layers' specs, facts). The stage and
    ``compress.quant.qat.prepare`` start here. ``cfg``: a PyTorch-side method's config (TorchSideOptions)."""
    facts: dict = {"method": cfg.method, "bits": cfg.weight_bits}
    if cfg.fold_bn:
        pairs = fold_batchnorm(model)
        if pairs:
            record_transform(model, "fold_bn", pairs=pairs)
            facts["folded_bn"] = len(pairs)
    keep = cfg.keep_first_last if cfg.keep_first_last is not None else keep_first_last
    names = layer_names(model, cfg, keep, path)
    missing = [n for n in cfg.exclude if n not in dict(model.named_modules())]
    if missing:
        raise RecipeError(f"{path}.exclude", f"no layer named {missing[0]!r} in the model")
    if not names:
        raise RecipeError(path, "the model has no Conv/Linear layer left to quantize")
    if getattr(cfg, "group_size", None):
        spec = {**spec, "group_size": cfg.group_size}
        facts["group_size"] = cfg.group_size
    layers = {n: spec for n in names}
    wrap(model, layers)
    if spec.get("act_bits"):
        facts["activation_bits"] = spec["act_bits"]
        if calibration is not None and calibrate_batches:
            calibrate(model, calibration, calibrate_batches)
    return layers, facts


def pack_layers(model: nn.Module, cfg, layers: dict, facts: dict) -> dict:
    """After training: eval mode, weights packed, the wrapping recorded for reload; the facts with sizes."""
    model.eval()
    pack_model(model)
    record_transform(model, cfg.method, layers=layers, bits=cfg.weight_bits)
    return {**facts, **sizes(model), "quantized_layers": len(layers)}


# model -> (config, wrapped layers, facts) between prepare and convert; weak: a dropped model takes its entry along
_PREPARED: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()
_FACTS: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def prepare(model: nn.Module, config, *, calibration=None, path: str = "quantize") -> nn.Module:
    """Fold BatchNorm and wrap the Conv/Linear layers of ``model`` (in place) in fake-quantized layers, as the
    quantize stage's QAT does before it trains; returns ``model``.

    ``config``: ``QuantizeConfig(method="qat", ...)`` (``finetune``, ``kd`` and ``export_onnx`` are the stage's
    own training and file options and are not used here). ``calibration``: batches (a loader of ``(x, y)``)
    whose first ``calibration_batches`` initialise the activation ranges; without it the first training batches
    do. Build your optimizer after ``prepare``: BatchNorm folding replaces layers (LSQ adds step sizes).
    """
    # the method's config by its name: this module is below compress.quant.methods (no import of it here)
    cfg = config
    if getattr(cfg, "method", None) != "qat":
        raise RecipeError(f"{path}.method", f"prepare/convert are QAT's; got method '{getattr(cfg, 'method', cfg)}'")
    cfg.check_rules(path)
    if model in _PREPARED:
        raise RuntimeError("the model is already prepared for QAT; convert it first")
    layers, facts = prepare_layers(model, cfg, cfg.layer_spec(path), path, calibration=calibration,
                                   calibrate_batches=cfg.calibration_batches)
    _PREPARED[model] = (cfg, layers, facts, path)
    return model


def convert(model: nn.Module, example_inputs: Any = None, path: Optional[str | Path] = None, *, data=None,
            traced: Optional[nn.Module] = None) -> nn.Module:
    """Pack the trained fake-quantized weights (k-bit codes; the model is then for inference), as the stage does
    after training; returns ``model``. With ``path`` (8-bit weights and activations) also write the QDQ ONNX
    file the stage writes, ``example_inputs`` being one batch the model takes; with ``data`` (a DataBundle) the
    file is checked against the PyTorch model as the stage checks it (``check:`` options). What the stage
    would report (sizes, layers, the file) is then ``facts(model)``. ``traced``: what to export instead of
    ``model`` itself, a wrapper that calls it (a transformers model's keyword inputs and ``logits``)."""
    if model not in _PREPARED:
        raise RuntimeError("the model was not prepared with compress.quant.qat.prepare")
    cfg, layers, facts, where = _PREPARED.pop(model)
    facts = pack_layers(model, cfg, layers, facts)
    if path is not None:
        spec = cfg.layer_spec(where)
        if cfg.weight_bits != 8 or spec["act_bits"] != 8:
            raise RecipeError(f"{where}.bits", "an int8 ONNX file needs 8-bit weights and activations")
        if example_inputs is None:
            raise ValueError("writing the ONNX file traces the model: pass example_inputs (one batch it takes)")
        fmt = cfg.int8_format(where)
        out = export_qdq(traced if traced is not None else model, example_inputs, Path(path), cfg.opset, fmt.weight_type)
        facts.update(onnx=str(out), onnx_bytes=out.stat().st_size)
        if data is not None:
            from compress.quant.methods.base import check_int8_file

            def reference(x):
                with torch.no_grad():
                    return model(x).cpu().numpy()

            facts["int8_check"] = check_int8_file(out, reference, data, cfg, fmt, where)
    _FACTS[model] = facts
    return model


def facts(model: nn.Module) -> dict:
    """The stage's facts for a converted model: weight bytes, compression, quantized layers, the ONNX file."""
    return dict(_FACTS.get(model, {}))
