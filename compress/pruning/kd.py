"""A plain knowledge-distillation loss hook (Hinton et al. 2015) for fine-tuning after pruning.

The distill stage's DistillHook is built around its own TrainConfig-derived options and a fixed
student; fine-tuning here swaps the student between steps (reverts), so this is the minimal KD term.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from compress.trainer import Hook


class KDHook(Hook):
    """loss <- (1 - alpha) * loss + alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T))."""

    def __init__(self, teacher: nn.Module, temperature: float = 4.0, alpha: float = 0.5):
        self.teacher, self.T, self.alpha = teacher, temperature, alpha
        self._input = None
        self._handle = None

    def _grab(self, module, args):
        # The trainer augments inside its loop: the teacher must see the input the student saw.
        if module.training:
            self._input = args[0]

    def on_fit_start(self, trainer) -> None:
        self.teacher.eval().to(trainer.device)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self._handle = trainer.model.register_forward_pre_hook(self._grab)

    def on_fit_end(self, trainer) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def loss(self, trainer, batch, outputs, loss):
        x = self._input if self._input is not None else batch.inputs
        with torch.no_grad():
            t = self.teacher(x)
        if trainer.data.task != "classification":
            return (1 - self.alpha) * loss + self.alpha * F.mse_loss(outputs, t)
        kd = F.kl_div(F.log_softmax(outputs / self.T, 1), F.log_softmax(t / self.T, 1), log_target=True,
                      reduction="batchmean") * self.T ** 2
        return (1 - self.alpha) * loss + self.alpha * kd
