"""Shared pieces of the Python API: the result every stage returns and data coercion."""
from __future__ import annotations

from typing import NamedTuple

import torch.nn as nn

from compress.data import DataBundle
from compress.errors import CompressError


class Result(NamedTuple):
    """What every stage function returns: ``model, metrics = compress.prune(...)``."""

    model: nn.Module
    metrics: dict


def as_data(data) -> DataBundle:
    """Accept a DataBundle, a dataset name, or a tuple of loaders ``(train, val[, test])``."""
    if isinstance(data, DataBundle):
        return data
    if isinstance(data, str):
        from compress.data import create_data

        return create_data(data)
    if isinstance(data, (tuple, list)) and 1 <= len(data) <= 3:
        return DataBundle.from_loaders(*data)
    raise CompressError(f"expected a DataBundle, a dataset name or (train, val[, test]) loaders, got {type(data).__name__}")
