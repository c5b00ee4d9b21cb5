"""Fake quantization for QAT: per-channel weights, per-tensor activations (EMA or LSQ ranges).

The forward/backward of the EMA path is torch's own ``torch.fake_quantize_per_*_affine`` (a clipped
straight-through estimator that also exports to ONNX QuantizeLinear/DequantizeLinear). LSQ (Esser et
al. 2020, learned step size) is written by hand because torch only has it as a private op.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)


def weight_scale(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric per-output-channel scale (axis 0): max |w| maps to the largest positive code."""
    qmax = (1 << (bits - 1)) - 1
    amax = w.detach().abs().reshape(w.shape[0], -1).amax(dim=1)
    return (amax / max(qmax, 1)).clamp_min(1e-8)


def _along(axis: int | None, ndim: int, scale: torch.Tensor, zero_point: torch.Tensor | int):
    """Per-channel scale and zero point shaped to broadcast along ``axis`` of an ``ndim`` tensor."""
    if axis is None:
        return scale, zero_point
    shape = [1] * ndim
    shape[axis] = -1
    return scale.view(shape), zero_point.view(shape) if torch.is_tensor(zero_point) else zero_point


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | int, qmin: int, qmax: int,
             axis: int | None = None) -> torch.Tensor:
    """Integer codes (as int32). ``axis`` broadcasts per-channel scales."""
    scale, zero_point = _along(axis, x.ndim, scale, zero_point)
    return torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax).to(torch.int32)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | int = 0,
               axis: int | None = None) -> torch.Tensor:
    scale, zero_point = _along(axis, q.ndim, scale, zero_point)
    return (q.float() - zero_point) * scale


def fake_quant_weight(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    qmin, qmax = qrange(bits, signed=True)
    zp = torch.zeros(w.shape[0], dtype=torch.int32, device=w.device)
    return torch.fake_quantize_per_channel_affine(w, scale.float(), zp, 0, qmin, qmax)


def _grad_scale(x: torch.Tensor, factor: float) -> torch.Tensor:
    return (x - x * factor).detach() + x * factor


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return (x.round() - x).detach() + x


def lsq(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
        grad_factor: float) -> torch.Tensor:
    """LSQ fake quant: gradients reach ``scale`` (scaled by ``grad_factor``) and ``x`` inside the clip range."""
    s = _grad_scale(scale, grad_factor)
    q = torch.clamp(x / s + zero_point, qmin, qmax)
    return (_round_ste(q) - zero_point) * s


class ActQuant(nn.Module):
    """Per-tensor asymmetric fake quant of activations.

    ``ema``: range is an exponential moving average of batch min/max (updated in training).
    ``lsq``: the step size is a trainable parameter, initialised from the first batch's range.
    """

    def __init__(self, bits: int = 8, mode: Literal["ema", "lsq"] = "ema", momentum: float = 0.01):
        super().__init__()
        self.bits, self.mode, self.momentum = bits, mode, momentum
        self.qmin, self.qmax = qrange(bits, signed=False)
        self.register_buffer("min_val", torch.tensor(0.0))
        self.register_buffer("max_val", torch.tensor(0.0))
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("zero_point", torch.tensor(0, dtype=torch.int32))
        self.register_buffer("initialized", torch.tensor(False))
        self.lsq_scale = nn.Parameter(torch.tensor(1.0)) if mode == "lsq" else None
        self.enabled = True

    def extra_repr(self) -> str:
        return f"bits={self.bits}, mode={self.mode}"

    @torch.no_grad()
    def _set_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        lo, hi = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)  # zero must be exactly representable
        scale = ((hi - lo) / (self.qmax - self.qmin)).clamp_min(1e-8)
        zp = torch.clamp(torch.round(self.qmin - lo / scale), self.qmin, self.qmax)
        self.scale.copy_(scale)
        self.zero_point.copy_(zp.to(torch.int32))

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        lo, hi = x.detach().min(), x.detach().max()
        if not bool(self.initialized):
            self.min_val.copy_(lo)
            self.max_val.copy_(hi)
            self.initialized.fill_(True)
        else:
            self.min_val.lerp_(lo, self.momentum)
            self.max_val.lerp_(hi, self.momentum)
        self._set_range(self.min_val, self.max_val)
        if self.lsq_scale is not None:
            self.lsq_scale.copy_(self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if self.training and (self.mode == "ema" or not bool(self.initialized)):
            self.observe(x)
        if self.training and self.mode == "lsq":
            grad_factor = 1.0 / (x.numel() * self.qmax) ** 0.5
            scale = self.lsq_scale.abs() + 1e-8
            with torch.no_grad():
                self.scale.copy_(scale)
            return lsq(x, scale, self.zero_point.float(), self.qmin, self.qmax, grad_factor)
        if torch.onnx.is_in_onnx_export() and self.bits != 8:
            # ONNX Q/DQ has no sub-byte range here: export the same arithmetic as float ops.
            zp = self.zero_point.float()
            return (torch.clamp(torch.round(x / self.scale) + zp, self.qmin, self.qmax) - zp) * self.scale
        return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, self.qmin, self.qmax)


class WeightQuant(nn.Module):
    """Per-output-channel symmetric fake quant of a weight: max-abs scale, or an LSQ-learned one."""

    def __init__(self, weight: torch.Tensor, bits: int, learned: bool = False):
        super().__init__()
        self.bits, self.learned = bits, learned
        self.qmin, self.qmax = qrange(bits, signed=True)
        init = weight_scale(weight, bits)
        if learned and bits < 8:
            # LSQ's initialisation 2 <|w|> / sqrt(qmax), per channel: better than max-abs at 2-4 bits.
            mean_abs = weight.detach().abs().reshape(weight.shape[0], -1).mean(dim=1)
            init = (2 * mean_abs / max(self.qmax, 1) ** 0.5).clamp_min(1e-8)
        self.scale = nn.Parameter(init.clone()) if learned else None
        self.register_buffer("w_scale", init.clone())

    def extra_repr(self) -> str:
        return f"bits={self.bits}, learned={self.learned}"

    def current_scale(self, w: torch.Tensor) -> torch.Tensor:
        if self.learned:
            return self.scale.abs() + 1e-8
        return weight_scale(w, self.bits)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        scale = self.current_scale(w)
        with torch.no_grad():
            self.w_scale.copy_(scale.detach())
        if self.learned and self.training:
            grad_factor = 1.0 / (w[0].numel() * self.qmax) ** 0.5
            zp = torch.zeros((), device=w.device)
            shape = [-1] + [1] * (w.ndim - 1)
            return lsq(w, scale.view(shape), zp, self.qmin, self.qmax, grad_factor)
        return fake_quant_weight(w, scale.detach() if self.learned else scale, self.bits)

    @torch.no_grad()
    def codes(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(integer codes, per-channel scale) of the weight as the forward pass quantizes it."""
        scale = self.current_scale(w).detach()
        return quantize(w, scale, 0, self.qmin, self.qmax, axis=0), scale
