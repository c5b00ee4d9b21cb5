"""Binary weights and activations with a straight-through estimator clipped like hardtanh.

BinaryConnect (Courbariaux et al. 2015): sign(w) in the forward pass, the real weight is what the
optimizer updates. XNOR-Net (Rastegari et al. 2016): sign(w) times a per-output-channel scale
mean|w|, and sign(x) inputs. Hand-written: no maintained library ships binary layers for torch.
"""
from __future__ import annotations

import torch


class SignSTE(torch.autograd.Function):
    """sign with +1 at zero; backward passes the gradient only where |x| <= 1 (d hardtanh / dx)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= 1).to(grad.dtype)


def binary_sign(x: torch.Tensor) -> torch.Tensor:
    return SignSTE.apply(x)


def binary_activation(x: torch.Tensor) -> torch.Tensor:
    """XNOR-Net input binarization with the threshold just above zero: after a ReLU this gives +1
    where the unit fired and -1 where it did not (a threshold at 0 would make every such input +1)."""
    return SignSTE.apply(x - 1e-6)


def channel_scale(w: torch.Tensor, mode: str) -> torch.Tensor:
    """Per-output-channel (or per-layer) mean |w|; ones when ``mode`` is 'none'."""
    if mode == "none":
        return torch.ones(w.shape[0], device=w.device)
    flat = w.abs().reshape(w.shape[0], -1)
    if mode == "layer":
        return flat.mean().expand(w.shape[0])
    return flat.mean(dim=1)


def binarize_weight(w: torch.Tensor, scale_mode: str) -> torch.Tensor:
    shape = [-1] + [1] * (w.ndim - 1)
    return binary_sign(w) * channel_scale(w, scale_mode).view(shape)
