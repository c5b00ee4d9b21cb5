"""The Hugging Face ``Trainer`` with compress's distillation, pruning schedule and QAT, its loop in charge.

    trainer = DistillationTrainer(model=student, teacher=teacher, distill_config=DistillConfig(temperature=4),
                                  args=TrainingArguments(...), train_dataset=..., callbacks=[PruningCallback(...)])
    trainer.train(); trainer.save_model("out")      # from_pretrained("out") reloads it, pruned widths included

Needs ``pip install 'compress[hf]'``. Each piece is a thin layer over the plain building blocks
(``compress.kd.Distiller``, ``compress.pruning.Pruner``, ``compress.quant.qat``): the same configs as a recipe.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn

from compress.integrations import require
from compress.models.adapter import IOModule

_tf = require("transformers", "hf", "compress.integrations.transformers")
require("accelerate", "hf", "compress.integrations.transformers")  # transformers.Trainer runs on it
Trainer, TrainerCallback = _tf.Trainer, _tf.TrainerCallback

__all__ = ["DistillationTrainer", "PruningCallback", "QATCallback"]


class _EpochCallback(TrainerCallback):
    def __init__(self, distiller):
        self.distiller = distiller

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.distiller.set_epoch(int(round(state.epoch or 0)))


class DistillationTrainer(Trainer):
    """A ``transformers.Trainer`` whose training loss is the distill stage's: the model's own loss (its
    ``outputs.loss``, from ``labels``) mixed with the KD term of ``teacher``'s logits, as ``distill_config``
    (a ``DistillConfig``) says.

    What it adds to a training step: one forward of the frozen teacher (``no_grad``) on the same batch,
    without ``labels``. Evaluation reports the model's own loss. The loss is a per-batch mean, so the
    Trainer divides it by the gradient accumulation steps as usual; fp16/bf16 autocast covers the teacher
    too. ``hints`` adapters join the Trainer's optimizer as one more parameter group (no second optimizer);
    ``kd_until_epoch`` follows the Trainer's epochs. ``trainer.distiller.close()`` removes the hooks.
    """

    def __init__(self, *args, teacher: nn.Module, distill_config=None, example_inputs: Any = None, **kwargs):
        super().__init__(*args, **kwargs)
        from compress.kd.distiller import Distiller

        self.distiller = Distiller(teacher, distill_config, student=self.model, example_inputs=example_inputs)
        # the KD loss is a mean over this batch, not normalised over the accumulated batch: let the Trainer divide
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False
        self.add_callback(_EpochCallback(self.distiller))

    def create_optimizer(self, model=None):
        opt = super().create_optimizer(model) if model is not None else super().create_optimizer()
        extra = [p for p in self.distiller.parameters() if p.requires_grad]
        if extra and not any(p is extra[0] for g in opt.param_groups for p in g["params"]):
            opt.add_param_group({"params": extra, "weight_decay": 0.0})
        return opt

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "labels" not in inputs:
            raise ValueError("DistillationTrainer needs labels in every batch: the model's own loss on them is the "
                             "hard-label part of the distill loss (check the data collator)")
        outputs = model(**inputs)
        hard = outputs["loss"] if isinstance(outputs, dict) else outputs[0]
        if model.training:
            teacher_inputs = {k: v for k, v in inputs.items() if k != "labels"}
            loss = self.distiller.loss(outputs, teacher_inputs, hard_loss=hard,
                                       mask=inputs.get("attention_mask"))  # padding: no KD term (per-token logits)
        else:
            loss = hard
        return (loss, outputs) if return_outputs else loss


def _ffn_layers(model: nn.Module, width: int) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.out_features == width]


class PruningCallback(TrainerCallback):
    """The prune stage's schedule (a ``PruneConfig``) inside ``Trainer.train``.

    What it adds: at the start of every ``epochs_per_step``-th epoch (default: the config's ``finetune.epochs``,
    the epochs the stage fine-tunes between steps) the next pruning step, which re-points the Trainer's
    optimizer at the pruned tensors; after each optimizer step, magnitude pruning's masks are re-applied.

    Channel pruning of a transformers model prunes the MLP widths (``config.intermediate_size``) and keeps
    the attention heads and the residual width, then writes the new width into ``model.config``: the folder
    ``Trainer.save_model`` writes reloads with ``from_pretrained``. ``example_inputs``: one batch of the
    model's keyword inputs (``input_ids``, ``attention_mask``; no labels), for tracing.
    """

    def __init__(self, config=None, example_inputs: Any = None, *, epochs_per_step: Optional[int] = None):
        from compress.pruning.methods import PruneConfig

        self.config = config if config is not None else PruneConfig()
        self.example = example_inputs
        self.every = epochs_per_step or self.config.finetune.epochs
        self.pruner = None
        self._ffn: list[str] = []

    def _build(self, model: nn.Module) -> None:
        from compress.pruning.pruner import Pruner

        cfg, hf = self.config, getattr(model, "config", None)
        width = getattr(hf, "intermediate_size", None)
        if cfg.method == "channel" and isinstance(width, int) and cfg.ignored_layers is None:
            # everything but the MLP's first layers is kept: heads and residual width are what the config fixes
            self._ffn = _ffn_layers(model, width)
            keep = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding)) and n not in self._ffn]
            cfg = cfg.model_copy(update={"ignored_layers": keep})
        self.pruner = Pruner(model, cfg, self.example)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.pruner is None:
            self._build(model)

    def on_epoch_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        epoch = int(round(state.epoch or 0))
        if self.pruner is not None and not self.pruner.done and epoch % self.every == 0:
            self.pruner.step(optimizer)
            self._sync_config(model)

    def on_step_end(self, args, state, control, **kwargs):
        if self.pruner is not None:
            self.pruner.after_optimizer_step()

    def _sync_config(self, model: nn.Module) -> None:
        if not self._ffn:
            return
        widths = {model.get_submodule(n).out_features for n in self._ffn}
        if len(widths) != 1:
            raise ValueError(f"the MLP widths differ between layers ({sorted(widths)}): config.intermediate_size "
                             "cannot hold them; use scope: layer and no layer_ratios")
        model.config.intermediate_size = widths.pop()

    def summary(self) -> dict:
        return self.pruner.summary() if self.pruner is not None else {}


class QATCallback(TrainerCallback):
    """The quantize stage's QAT (``QuantizeConfig(method="qat", ...)``) inside ``Trainer.train``.

    What it adds: when the Trainer is built (before its optimizer), ``compress.quant.qat.prepare`` wraps the
    model's Conv/Linear layers in fake-quantized ones; every forward then quantizes weights and activations
    (the first training batches set the activation ranges). At the end of training, with ``onnx_path`` and
    ``example_inputs``, the 8-bit model is written as the QDQ ONNX file the stage writes (``convert``).
    The checkpoint to deploy is that file: ``save_model`` keeps the fake-quantized layers' weights.
    """

    def __init__(self, config=None, *, example_inputs: Any = None, onnx_path: Optional[str | Path] = None,
                 model: Optional[nn.Module] = None):
        from compress.quant.methods import QuantizeConfig

        self.config = config if config is not None else QuantizeConfig(method="qat")
        self.example, self.onnx_path, self.model = example_inputs, onnx_path, None
        if model is not None:  # prepare now: a Trainer built later makes its optimizer over the wrapped model
            self._prepare(model)

    def _prepare(self, model: nn.Module) -> None:
        from compress.quant.qat import prepare

        if self.model is None:
            self.model = prepare(model, self.config)

    def on_init_end(self, args, state, control, model=None, **kwargs):
        self._prepare(model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        from compress.quant.qat import convert

        if self.onnx_path is not None and self.model is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the tracer's notes about Python-side shape checks
                convert(self.model, _to_cpu(self.example), self.onnx_path, traced=IOModule(self.model, list(self.example)))


def _to_cpu(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.cpu()
    return {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in x.items()}
