"""Unstructured magnitude pruning: masks chosen by |w|, kept through fine-tuning by a trainer hook.

torch.nn.utils.prune reparametrizes each weight as ``weight_orig * weight_mask`` (new state_dict keys,
forward pre-hooks), so a checkpoint would no longer load into the registry's plain model; here masks
are plain tensors that a hook multiplies in after every optimizer step, and the model stays plain.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
import torch.nn as nn

from compress.trainer import Hook

PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def prunable_layers(model: nn.Module, ignored: Iterable[str] = ()) -> dict[str, nn.Module]:
    """Conv/Linear layers by module name, minus ``ignored`` (names, and everything under them)."""
    ignored = list(ignored)
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, PRUNABLE) and not any(name == i or name.startswith(i + ".") for i in ignored):
            out[name] = m
    return out


def classifier_name(model: nn.Module) -> Optional[str]:
    """The classifier the model's adapter declares (``compress.models.adapter``): never pruned by default."""
    from compress.models.adapter import adapter_of

    return adapter_of(model).head


def _kth_abs(values: torch.Tensor, k: int) -> float:
    """The k-th smallest |value| (k >= 1)."""
    return float(values.abs().flatten().kthvalue(k).values)


@torch.no_grad()
def magnitude_masks(layers: dict[str, nn.Module], sparsity: float, scope: str = "global",
                    layer_sparsity: Optional[dict[str, float]] = None) -> dict[str, torch.Tensor]:
    """Boolean keep-masks that zero the smallest-|w| fraction ``sparsity`` of the layers' weights.

    ``global`` ranks all weights together (layers end up with different sparsity); ``layer`` prunes each
    layer to the same fraction. ``layer_sparsity`` overrides the fraction of named layers (they are
    then ranked on their own).
    """
    layer_sparsity = layer_sparsity or {}
    masks: dict[str, torch.Tensor] = {}
    pooled = {n: m for n, m in layers.items() if n not in layer_sparsity}
    if scope == "global" and pooled:
        flat = torch.cat([m.weight.detach().abs().flatten() for m in pooled.values()])
        k = int(round(sparsity * flat.numel()))
        thr = _kth_abs(flat, k) if k > 0 else -1.0
        for n, m in pooled.items():
            masks[n] = m.weight.detach().abs() > thr
    else:
        for n, m in pooled.items():
            masks[n] = _layer_mask(m.weight, sparsity)
    for n, s in layer_sparsity.items():
        if n in layers:
            masks[n] = _layer_mask(layers[n].weight, s)
    return masks


def _layer_mask(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    k = int(round(sparsity * w.numel()))
    if k <= 0:
        return torch.ones_like(w, dtype=torch.bool)
    # topk keeps exactly numel-k weights even when magnitudes tie (a threshold could drop more).
    keep = torch.zeros(w.numel(), dtype=torch.bool, device=w.device)
    keep[w.detach().abs().flatten().topk(w.numel() - k).indices] = True
    return keep.view_as(w)


@torch.no_grad()
def apply_masks(layers: dict[str, nn.Module], masks: dict[str, torch.Tensor]) -> None:
    for n, mask in masks.items():
        layers[n].weight.mul_(mask.to(layers[n].weight.device, layers[n].weight.dtype))


class MaskHook(Hook):
    """Re-applies the masks after every optimizer step, so pruned weights stay exactly zero."""

    def __init__(self, layers: dict[str, nn.Module], masks: dict[str, torch.Tensor]):
        self.layers, self.masks = layers, masks

    def on_fit_start(self, trainer) -> None:
        apply_masks(self.layers, self.masks)

    def after_step(self, trainer) -> None:
        apply_masks(self.layers, self.masks)

    def on_fit_end(self, trainer) -> None:  # the trainer may have restored its best weights
        apply_masks(self.layers, self.masks)


def weight_sparsity(layers: dict[str, nn.Module]) -> float:
    total = sum(m.weight.numel() for m in layers.values())
    zeros = sum(int((m.weight == 0).sum()) for m in layers.values())
    return zeros / max(total, 1)


def sparse_bytes(t: torch.Tensor, value_bytes: int = 4, index_bytes: int = 4) -> dict[str, int]:
    """Storage of one tensor: dense, bitmask + non-zero values, and CSR (rows = first dim)."""
    nnz = int(torch.count_nonzero(t))
    rows = t.shape[0] if t.ndim else 1
    return {
        "dense": t.numel() * value_bytes,
        "bitmask": math.ceil(t.numel() / 8) + nnz * value_bytes,
        "csr": nnz * (value_bytes + index_bytes) + (rows + 1) * index_bytes,
    }


def storage_report(model: nn.Module) -> dict:
    """Bytes of all parameters dense vs each tensor in its smallest form (dense, bitmask or CSR), fp32."""
    dense = sparse = 0
    formats: dict[str, int] = {}
    seen = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        sizes = sparse_bytes(p.detach())
        fmt = min(sizes, key=sizes.get)
        formats[fmt] = formats.get(fmt, 0) + 1
        dense += sizes["dense"]
        sparse += sizes[fmt]
    return {"dense_bytes": dense, "sparse_bytes": sparse, "sparse_formats": formats,
            "sparse_ratio": round(dense / max(sparse, 1), 2)}
