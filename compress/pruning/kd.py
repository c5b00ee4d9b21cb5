"""A plain knowledge-distillation loss hook (Hinton et al. 2015) for fine-tuning after pruning.

The distill stage's DistillHook is built around its own TrainConfig-derived options and a fixed
student; fine-tuning here swaps the student between steps (reverts), so this is the minimal KD term.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from compress.distill_losses import combine, kd_term, teacher_target
from compress.trainer import Hook


class KDHook(Hook):
    """loss <- alpha * loss + (1 - alpha) * T^2 * KL(softmax(teacher/T) || softmax(student/T)).

    alpha weighs the hard-label loss, as in the distill stage (same formulas: compress.distill_losses).
    """

    def __init__(self, teacher: nn.Module, temperature: float = 4.0, alpha: float = 0.5):
        self.teacher, self.T, self.alpha = teacher, temperature, alpha
        self._input = None
        self._handle = None

    def _grab(self, module, args):
        # The trainer augments inside its loop: the teacher must see the input the student saw.
        if module.training:
            self._input = args[0]

    def on_fit_start(self, trainer) -> None:
        from compress.stages.distill import frozen

        # The teacher may be the recipe's (state.teacher): freeze it for this fit only, then restore its flags.
        self._frozen = frozen([self.teacher.to(trainer.device)])
        self._frozen.__enter__()
        self._handle = trainer.model.register_forward_pre_hook(self._grab)

    def on_fit_end(self, trainer) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        if getattr(self, "_frozen", None) is not None:
            self._frozen.__exit__(None, None, None)
            self._frozen = None
        self._input = None

    def loss(self, trainer, batch, outputs, loss):
        x = self._input if self._input is not None else batch.inputs
        with torch.no_grad():
            t = self.teacher(x)
        kind = "kl" if trainer.data.task == "classification" else "regression"
        soft = kd_term(outputs, teacher_target([t], [1.0], self.T, kind), self.T, kind)
        return combine(loss, soft, kind, self.alpha, beta=1.0 - self.alpha)
