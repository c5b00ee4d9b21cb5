"""Distillation losses: soft targets from one or several teachers, and the KD terms that use them.

Kept apart from the stage so that the formulas can be tested against hand-computed values.
"""
from __future__ import annotations

from typing import Literal, Sequence

import torch
import torch.nn.functional as F

KDLoss = Literal["kl", "soft_ce", "mse_logits", "regression"]


def teacher_target(outputs: Sequence[torch.Tensor], weights: Sequence[float], temperature: float,
                   kind: KDLoss) -> torch.Tensor:
    """What the student is pulled towards: averaged softened probabilities (kl, soft_ce) or averaged outputs.

    Ensembles average probabilities, not logits, for kl/soft_ce (Hinton 2015 averages the soft targets).
    """
    if kind in ("kl", "soft_ce"):
        return sum(w * F.softmax(o.float() / temperature, dim=1) for w, o in zip(weights, outputs))
    return sum(w * o.float() for w, o in zip(weights, outputs))


def kd_term(student: torch.Tensor, target: torch.Tensor, temperature: float, kind: KDLoss) -> torch.Tensor:
    """The soft part of the loss, averaged over the batch.

    kl:         T^2 * KL(target || softmax(s/T))   (T^2 keeps the soft gradients' scale as T changes)
    soft_ce:    T^2 * CE(target, softmax(s/T))     (KL plus the teacher's entropy: same gradients)
    mse_logits: MSE(s, averaged teacher logits)     (Ba & Caruana 2014)
    regression: MSE(s, averaged teacher predictions) over every entry, observed or not
    """
    if kind == "kl":
        log_q = F.log_softmax(student / temperature, dim=1)
        return temperature ** 2 * F.kl_div(log_q, target, reduction="batchmean")
    if kind == "soft_ce":
        log_q = F.log_softmax(student / temperature, dim=1)
        return temperature ** 2 * -(target * log_q).sum(dim=1).mean()
    return F.mse_loss(student, target.view_as(student))


def combine(hard: torch.Tensor, soft: torch.Tensor, kind: KDLoss, alpha: float, beta: float) -> torch.Tensor:
    """alpha*hard + (1-alpha)*soft for classification; hard + beta*soft for regression KD."""
    if kind == "regression":
        return hard + beta * soft
    return alpha * hard + (1 - alpha) * soft


def hint_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor) -> torch.Tensor:
    """FitNets hint: MSE between the (adapted) student feature and the teacher's."""
    return F.mse_loss(student_feat, teacher_feat)
