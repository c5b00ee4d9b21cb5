"""What every stage's output is measured by: task metrics, size on disk, parameters, non-zeros."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn

from compress.config import StrictModel


class BenchmarkConfig(StrictModel):
    """The recipe's ``benchmark:`` section."""

    split: Literal["test", "val"] = "test"


def count_params(model: nn.Module) -> tuple[int, int]:
    """(parameters, non-zero parameters), counting each shared tensor once."""
    seen, total, nonzero = set(), 0, 0
    for p in list(model.parameters()) + [b for n, b in model.named_buffers() if n.endswith("weight_packed")]:
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        nonzero += int(torch.count_nonzero(p.detach()))
    return total, nonzero


def file_size(path: str | Path) -> int:
    return Path(path).stat().st_size


def saved_size(model: nn.Module) -> int:
    """Bytes of the model's checkpoint, for models that were never written to a run directory."""
    from compress.checkpoint import save_model

    with tempfile.TemporaryDirectory() as d:
        return file_size(save_model(model, Path(d) / "model.pt"))
