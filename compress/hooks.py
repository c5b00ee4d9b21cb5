"""The trainer's extension points, apart from the trainer so that models can bring hooks without importing it."""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

import torch
import torch.nn as nn

if TYPE_CHECKING:  # annotations only: no import at run time, no cycle
    from compress.trainer import Batch, Trainer


class Hook:
    """Extension points of the loop. Override what you need; every method is optional."""

    def parameters(self) -> Iterable[nn.Parameter]:
        """Extra trainable parameters (for example a hint adapter), optimized with the model."""
        return ()

    def on_fit_start(self, trainer: "Trainer") -> None: ...
    def on_epoch_start(self, trainer: "Trainer", epoch: int) -> None: ...

    def loss(self, trainer: "Trainer", batch: Batch, outputs: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        return loss

    def after_step(self, trainer: "Trainer") -> None: ...
    def on_epoch_end(self, trainer: "Trainer", epoch: int, metrics: dict) -> None: ...
    def on_fit_end(self, trainer: "Trainer") -> None: ...

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None: ...
