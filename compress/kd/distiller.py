"""Distillation inside a training loop you already have: ``loss = kd.loss(student(x), x, y)``.

The distill stage's own hook (``DistillHook``) does the work, so a loss computed here is the stage's loss on
the same batch: same teacher targets, same mix of hard and soft terms, same hint adapters.

    with Distiller(teacher, DistillConfig(temperature=4, alpha=0.1)) as kd:
        for x, y in loader:
            loss = kd.loss(student(x), x, y)
            ...  # backward, step: your loop's own
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn as nn

from compress.errors import RecipeError
from compress.kd.hook import DistillHook, _is_mapping, token_mask
from compress.models.adapter import logits_of
from compress.kd.teachers import freeze, teacher_weights, unfreeze
from compress.metrics import LOSSES


def _device_of(x: Any) -> Optional[torch.device]:
    if isinstance(x, torch.Tensor):
        return x.device
    if _is_mapping(x) or isinstance(x, dict):
        return next((v.device for v in x.values() if isinstance(v, torch.Tensor)), None)
    return None


def _flat(logits: torch.Tensor) -> torch.Tensor:
    """Per-token outputs ``[B, T, V]`` are compared per token: KD losses take ``[N, V]``."""
    return logits.flatten(0, -2) if logits.ndim > 2 else logits


class Distiller:
    """The KD loss of a ``DistillConfig`` for your own loop, a context manager.

    What it adds to a step: one teacher forward (under ``no_grad``) on the batch you pass, and, with
    ``hints``, forward hooks on the student and teacher layers they name (removed by ``close``/``with``).
    The teacher is frozen (eval mode, no gradients) until ``close``; its outputs are never cached (your
    loop may augment or reorder batches). Hint adapters are trainable: add ``parameters()`` to your optimizer.

    ``config`` options that belong to compress's own trainer (epochs, optimizer, ``cache_teacher``,
    ``teacher``/``student`` recipe keys) are not used; ``kd_until_epoch`` is, through ``set_epoch``.
    ``hard_loss`` ``auto`` is cross-entropy (``masked_mse`` for ``loss: regression``).
    """

    def __init__(self, teacher: nn.Module | Sequence[nn.Module], config=None, *, student: Optional[nn.Module] = None,
                 example_inputs: Any = None, path: str = "distill"):
        from compress.kd.teachers import load_teachers
        from compress.stages.distill import DistillConfig

        cfg = config if config is not None else DistillConfig()
        teachers = load_teachers(teacher)
        weights = teacher_weights(cfg.teacher_weights, len(teachers), path)
        if cfg.hints and (student is None or example_inputs is None):
            raise RecipeError(f"{path}.hints", "hints need the student and an example batch: "
                                               "Distiller(teacher, config, student=model, example_inputs=x)")
        if cfg.hints and len(teachers) > 1:
            raise RecipeError(f"{path}.hints", f"hints need a single teacher; this one has {len(teachers)}")
        hard = cfg.hard_loss if cfg.hard_loss != "auto" else ("masked_mse" if cfg.loss == "regression" else "cross_entropy")
        self.config, self.hard_fn = cfg, LOSSES[hard]
        self._frozen = freeze(teachers)
        try:
            # without hints nothing is hooked: the batch comes with each loss() call
            self.hook = DistillHook(student if cfg.hints else None, teachers, cfg, weights, example_inputs, path)
        except Exception:
            unfreeze(teachers, self._frozen)
            raise
        self._device: Optional[torch.device] = None
        self._home: Optional[list[torch.device]] = None

    # -- the loop's side ------------------------------------------------------------------------------
    def loss(self, student_outputs: Any, batch: Any, targets: Optional[torch.Tensor] = None, *,
             hard_loss: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The distill stage's loss on this batch: hard-label loss and KD term mixed as the config says,
        plus hint terms.

        ``batch``: the inputs the student just saw (the teacher sees the same); a mapping is passed as keyword
        arguments (a tokenizer's batch). ``hard_loss``: a hard-label loss you computed (a transformers model's
        ``outputs.loss``); otherwise it is ``hard_loss`` of the config on ``targets``. ``mask``: for per-token
        logits, the positions the KD term averages over (an attention mask); default: targets not -100.
        """
        logits = logits_of(student_outputs)
        out = _flat(logits)
        if hard_loss is None:
            if targets is None:
                raise ValueError("Distiller.loss needs targets (labels) or hard_loss")
            hard_loss = self.hard_fn(out, targets.reshape(-1) if out is not logits else targets)
        if not self.hook.active:
            return hard_loss
        self._to(_device_of(batch))
        target, feats = self.hook.teacher_outputs(batch)
        keep = mask.bool() if mask is not None and logits.ndim >= 3 else token_mask(logits, targets)
        return self.hook.combined(out, hard_loss, _flat(target), feats, keep=keep)

    def _to(self, device: Optional[torch.device]) -> None:
        if device is not None and device != self._device:
            if self._home is None:  # where the caller's teachers were: close() puts them back
                self._home = [next(t.parameters(), torch.empty(0)).device for t in self.hook.teachers]
            for t in self.hook.teachers:
                t.to(device)
            self.hook.adapters.to(device)
            self._device = device

    def set_epoch(self, epoch: int) -> None:
        """0-based; with ``kd_until_epoch: k`` the KD term is on for epochs 0..k-1, hard labels alone after."""
        self.hook.on_epoch_start(None, epoch)

    @property
    def active(self) -> bool:
        return self.hook.active

    def parameters(self):
        """The hint adapters' parameters (none without hints): train them with the student."""
        return self.hook.parameters()

    def state_dict(self) -> dict:
        return self.hook.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.hook.load_state_dict(state)

    # -- lifetime ------------------------------------------------------------------------------------
    def close(self) -> None:
        """Remove the forward hooks, give the teachers back their training flags and their devices."""
        self.hook.close()
        if self._home is not None:
            for t, d in zip(self.hook.teachers, self._home):
                t.to(d)
            self._home, self._device = None, None
        if self._frozen is not None:
            unfreeze(self.hook.teachers, self._frozen)
            self._frozen = None

    def __enter__(self) -> "Distiller":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
