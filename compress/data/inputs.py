"""Named model inputs (``input_ids`` + ``attention_mask``) that move and slice like one tensor.

A dict subclass rather than a new batch protocol: the loop, the evaluator and the measures call
``x.to(device)``, ``x[:n]`` and ``x.shape`` on a batch's inputs, and these keep working for dict inputs.
"""
from __future__ import annotations

from typing import Any

import torch


class Inputs(dict):
    """``{name: tensor}`` with the batch on axis 0 of every tensor."""

    def to(self, *args: Any, **kwargs: Any) -> "Inputs":
        return Inputs({k: v.to(*args, **kwargs) for k, v in self.items()})

    def cpu(self) -> "Inputs":
        return self.to("cpu")

    def __getitem__(self, key):
        if isinstance(key, (slice, torch.Tensor, list)):
            return Inputs({k: v[key] for k, v in self.items()})
        return super().__getitem__(key)

    @property
    def shape(self) -> torch.Size:
        """The first tensor's shape (messages print ``shape[1:]``)."""
        return next(iter(self.values())).shape

    def repeat(self, n: int, *_ignored: int) -> "Inputs":
        return Inputs({k: v.repeat(n, *([1] * (v.ndim - 1))) for k, v in self.items()})


def as_inputs(x: Any) -> Any:
    """A plain dict from a user's loader becomes ``Inputs``; tensors pass through."""
    return Inputs(x) if isinstance(x, dict) and not isinstance(x, Inputs) else x


def to_device(x: Any, device, **kwargs: Any) -> Any:
    return as_inputs(x).to(device, **kwargs)
