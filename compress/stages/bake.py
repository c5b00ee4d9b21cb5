"""The ``bake_kernels`` stage: KernelNet layers -> plain ``nn.Linear`` holding ``W * k``.

Prune, quantize and export only know standard layers; after this stage the connections the kernel cut
are real zero weights they see (magnitude pruning keeps them pruned, channel pruning can remove units).
"""
from __future__ import annotations

import torch.nn as nn

from compress.api import Result
from compress.config import StrictModel
from compress.stages.base import StageResult, register_stage


class BakeConfig(StrictModel):
    """No options: every KernelLinear of the model is replaced (a model without one is left as it is)."""


def bake(model: nn.Module, config: BakeConfig | None = None, data=None) -> Result:
    """Bake ``model`` in place; metrics: the share of zero kernel entries and of zero Linear weights after."""
    from compress.models.kernelnet import KernelLinear, bake_kernels

    kernels = [m for m in model.modules() if isinstance(m, KernelLinear)]
    zeros = sum(m.kernel_zeros()[0] for m in kernels)
    total = sum(m.kernel_zeros()[1] for m in kernels)
    bake_kernels(model)
    linear = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    n = sum(w.numel() for w in linear)
    return Result(model, {"baked_layers": len(kernels), "kernel_zero_share": zeros / total if total else 0.0,
                          "zero_weight_share": sum(int((w == 0).sum()) for w in linear) / n if n else 0.0})


@register_stage("bake_kernels", BakeConfig, "turn KernelNet kernel layers into plain Linear layers (before prune/quantize)")
def run_bake(state, cfg: BakeConfig) -> StageResult:
    model, metrics = bake(state.model, cfg)
    return StageResult(model, facts=dict(metrics))
