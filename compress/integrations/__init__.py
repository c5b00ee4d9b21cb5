"""compress's distillation, pruning schedule and QAT inside training loops that are not compress's own.

- ``compress.integrations.transformers``: a ``DistillationTrainer`` and ``TrainerCallback``s for the
  Hugging Face ``Trainer`` (``pip install 'compress[hf]'``);
- ``compress.integrations.lightning``: Lightning callbacks (``pip install 'compress[lightning]'``).

Both wrap the plain building blocks, which any loop can use: ``compress.kd.Distiller``,
``compress.pruning.Pruner``, ``compress.quant.qat.prepare``/``convert``. Every integration leaves the
user's loop in charge: no extra data pass, no optimizer of its own; each says what it adds to a step.
"""
from __future__ import annotations

import importlib
from types import ModuleType

from compress.errors import CompressError


class MissingExtra(CompressError, ImportError):
    """An integration's package is not installed: one line naming the install command."""


def require(module: str, extra: str, what: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtra(f"{what} needs the optional package {module.split('.')[0]}: "
                           f"pip install 'compress[{extra}]'") from None
