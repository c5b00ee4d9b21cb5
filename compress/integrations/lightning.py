"""Lightning callbacks for compress's distillation, pruning schedule and QAT; your LightningModule stays in charge.

    kd = DistillationCallback(teacher, DistillConfig(temperature=4))
    class Student(LightningModule):
        def training_step(self, batch, i):
            x, y = batch
            return kd.loss(self(x), x, y)              # the distill stage's loss, on your batch
    Trainer(callbacks=[kd, PruningCallback(PruneConfig(method="channel", steps=2), x)]).fit(Student(), loader)

Needs ``pip install 'compress[lightning]'`` (``lightning`` or ``pytorch-lightning``: whichever is installed,
``lightning.pytorch`` first). Each callback is a thin layer over the plain building blocks
(``compress.kd.Distiller``, ``compress.pruning.Pruner``, ``compress.quant.qat``): the same configs as a recipe.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Optional

import torch.nn as nn

from compress.integrations import require

_pl = require("lightning.pytorch" if importlib.util.find_spec("lightning") else "pytorch_lightning", "lightning",
              "compress.integrations.lightning")
Callback = _pl.Callback

__all__ = ["DistillationCallback", "PruningCallback", "QATCallback"]


def _optimizer(trainer):
    return trainer.optimizers[0] if trainer.optimizers else None


class DistillationCallback(Callback):
    """The distill stage's KD loss for a LightningModule: call ``callback.loss(outputs, x, y)`` in
    ``training_step``.

    What it adds: the teacher is frozen and moved to the batch's device; each ``loss`` call runs one teacher
    forward (``no_grad``) on the batch you pass; ``kd_until_epoch`` follows ``trainer.current_epoch``. With
    ``hints`` (layer names inside your LightningModule, e.g. ``model.2``), forward hooks on both models and the
    adapters' parameters as one more group of your optimizer; hooks are removed at teardown.
    """

    def __init__(self, teacher: nn.Module, config=None, *, example_inputs: Any = None):
        self.teacher, self.config, self.example = teacher, config, example_inputs
        self.distiller = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        from compress.kd.distiller import Distiller

        if stage == "fit" and self.distiller is None:
            self.distiller = Distiller(self.teacher, self.config, student=pl_module, example_inputs=self.example)

    def on_fit_start(self, trainer, pl_module) -> None:
        extra = [p for p in self.distiller.parameters() if p.requires_grad]
        opt = _optimizer(trainer)
        if extra and opt is not None:
            self.distiller._to(pl_module.device)
            opt.add_param_group({"params": extra})

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.distiller.set_epoch(trainer.current_epoch)

    def loss(self, student_outputs, batch, targets=None, **kw):
        """``compress.kd.Distiller.loss``: hard-label loss and KD term mixed as the config says."""
        if self.distiller is None:
            raise RuntimeError("DistillationCallback.loss is for training_step: pass the callback to Trainer(callbacks=...)")
        return self.distiller.loss(student_outputs, batch, targets, **kw)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit" and self.distiller is not None:
            self.distiller.close()
            self.distiller = None


class PruningCallback(Callback):
    """The prune stage's schedule (a ``PruneConfig``) on your LightningModule (or its ``attr`` submodule).

    What it adds: at the start of every ``epochs_per_step``-th training epoch (default: the config's
    ``finetune.epochs``, what the stage fine-tunes between steps) the next pruning step, re-pointing your
    optimizer at the pruned tensors; after each training batch, magnitude pruning's masks are re-applied.
    ``example_inputs``: one batch the model takes (channel pruning traces it).
    """

    def __init__(self, config=None, example_inputs: Any = None, *, epochs_per_step: Optional[int] = None,
                 attr: Optional[str] = None):
        from compress.pruning.methods import PruneConfig

        self.config = config if config is not None else PruneConfig()
        self.example, self.attr = example_inputs, attr
        self.every = epochs_per_step or self.config.finetune.epochs
        self.pruner = None

    def on_fit_start(self, trainer, pl_module) -> None:
        from compress.pruning.pruner import Pruner

        if self.pruner is None:
            model = pl_module.get_submodule(self.attr) if self.attr else pl_module
            example = self.example.to(pl_module.device) if hasattr(self.example, "to") else self.example
            self.pruner = Pruner(model, self.config, example)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if not self.pruner.done and trainer.current_epoch % self.every == 0:
            self.pruner.step(_optimizer(trainer))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.pruner.after_optimizer_step()

    def summary(self) -> dict:
        return self.pruner.summary() if self.pruner is not None else {}


class QATCallback(Callback):
    """The quantize stage's QAT (``QuantizeConfig(method="qat", ...)``) on your LightningModule.

    What it adds: before ``configure_optimizers`` runs, ``compress.quant.qat.prepare`` folds BatchNorm and wraps
    the Conv/Linear layers in fake-quantized ones (``calibration``: a loader whose first batches set activation
    ranges; otherwise the first training batches do); at the end of ``fit``, ``convert`` packs the weights and,
    with ``onnx_path`` and ``example_inputs``, writes the stage's QDQ int8 ONNX file.
    """

    def __init__(self, config=None, *, calibration=None, example_inputs: Any = None,
                 onnx_path: Optional[str | Path] = None, attr: Optional[str] = None):
        from compress.quant.methods import QuantizeConfig

        self.config = config if config is not None else QuantizeConfig(method="qat")
        self.calibration, self.example, self.onnx_path, self.attr = calibration, example_inputs, onnx_path, attr
        self.model = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        from compress.quant.qat import prepare

        if stage == "fit" and self.model is None:
            model = pl_module.get_submodule(self.attr) if self.attr else pl_module
            self.model = prepare(model, self.config, calibration=self.calibration)

    def on_fit_end(self, trainer, pl_module) -> None:
        from compress.quant.qat import convert

        convert(self.model, self.example, self.onnx_path)  # the ONNX export runs on the CPU
