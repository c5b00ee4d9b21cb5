"""What a report row describes (``Subject``) and the real input batches it is measured on."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from compress.errors import CompressError


def batch_of(data, batch: int) -> torch.Tensor:
    """A real batch of exactly ``batch`` samples (repeated when the split is smaller)."""
    x = data.example_input(batch)
    if x.shape[0] < batch:
        x = x.repeat(math.ceil(batch / x.shape[0]), *([1] * (len(x.shape) - 1)))[:batch]  # len: Inputs have no ndim
    return x


@dataclass
class Subject:
    """What a report row describes: a PyTorch model, an ONNX file, or both, and the file to size."""

    model: Optional[nn.Module] = None
    onnx: Optional[Path] = None
    file: Optional[Path] = None

    @classmethod
    def load(cls, path: str | Path) -> "Subject":
        """A ``.onnx`` file or a compress checkpoint (``.pt``)."""
        path = Path(path)
        if not path.is_file():
            raise CompressError(f"{path}: no such model file")
        if path.suffix == ".onnx":
            return cls(None, path, path)
        from compress.checkpoint import load_model

        return cls(load_model(path), None, path)

    @classmethod
    def from_row(cls, row: dict) -> Optional["Subject"]:
        """Reload a finished stage (the baseline) from the files its report row names."""
        model = None
        if row.get("model_file") and Path(row["model_file"]).is_file():
            try:
                from compress.checkpoint import load_model

                model = load_model(row["model_file"])
            except CompressError:
                model = None
        art = Path(row["artifact"]) if row.get("artifact") else None
        onnx = art if art is not None and art.suffix == ".onnx" and art.is_file() else None
        if model is None and onnx is None:
            return None
        return cls(model, onnx, art)
