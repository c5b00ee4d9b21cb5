"""Sparsity-inducing penalties added to the training loss, as trainer hooks.

torch-pruning's GroupNormPruner/BNScalePruner fold their penalty into gradients in place of the loss
and are tied to a pruner object; these are plain loss terms that work with any stage's training.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
from pydantic import Field

from compress.config import StrictModel
from compress.trainer import Hook


class RegularizerConfig(StrictModel):
    kind: Literal["l1", "l2", "group_lasso"] = "group_lasso"
    strength: float = Field(1e-4, gt=0)  # multiplier of the penalty in the loss
    epochs: int = Field(0, ge=0)  # sparsity training before the first pruning step (the penalty also applies to fine-tuning)


class NormPenalty(Hook):
    """strength * sum over layers of ||w||_1 (l1), ||w||_2^2 (l2) or sum_filters ||w_f||_2 (group lasso).

    Group lasso (Wen et al. 2016) groups each output filter/row, driving whole channels to zero, which
    is what channel pruning then removes.
    """

    def __init__(self, layers: dict[str, nn.Module], kind: str = "group_lasso", strength: float = 1e-4):
        self.layers, self.kind, self.strength = layers, kind, strength

    def penalty(self) -> torch.Tensor:
        total = 0.0
        for m in self.layers.values():
            w = m.weight
            if self.kind == "l1":
                total = total + w.abs().sum()
            elif self.kind == "l2":
                total = total + w.pow(2).sum()
            else:
                total = total + w.flatten(1).norm(dim=1).sum()
        return torch.as_tensor(total)

    def loss(self, trainer, batch, outputs, loss):
        return loss + self.strength * self.penalty()


def L1Regularizer(layers, strength=1e-4) -> NormPenalty:
    return NormPenalty(layers, "l1", strength)


def L2Regularizer(layers, strength=1e-4) -> NormPenalty:
    return NormPenalty(layers, "l2", strength)


def GroupLassoRegularizer(layers, strength=1e-4) -> NormPenalty:
    return NormPenalty(layers, "group_lasso", strength)
