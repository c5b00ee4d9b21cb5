"""The ``distill`` stage: Hinton KD, FitNets hints, teacher ensembles, assistant chains, early-stopped KD.

The stage's config, ``compress.distill(...)`` and the recipe entry point; the losses, the KD hook and
teacher resolution they use live in ``compress.kd`` (shared with prune's and quantize's ``kd:``).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Literal, Optional, Sequence, Union

import torch.nn as nn
from pydantic import Field

from compress.api import Result, as_data
from compress.data import DataBundle
from compress.errors import RecipeError
from compress.kd.hook import DistillHook, HintConfig, KDLossName, check_kd
from compress.kd.teachers import (VARYING_SHAPES, IndexedDataset, cache_reason, check_teacher_epoch, check_teachers,
                                  frozen, load_teachers, resolve_teacher, teacher_items, teacher_weights)
from compress.stages.base import ModelField, ModelsField, StageResult, check_outputs, register_stage
from compress.trainer import Hook, TrainConfig, Trainer, evaluate
from compress.utils import resolve_device


class DistillConfig(TrainConfig):
    """Training options (epochs, optimizer, ...) plus how the teacher's knowledge enters the loss."""

    loss: KDLossName = "kl"  # the soft term (a registered KD loss); the hard-label loss is ``hard_loss``
    hard_loss: Literal["auto", "cross_entropy", "mse", "masked_mse", "token_cross_entropy"] = "auto"
    temperature: float = Field(4.0, gt=0)
    alpha: float = Field(0.1, ge=0, le=1)  # weight of the hard-label loss (classification)
    beta: float = Field(1.0, ge=0)  # weight of the teacher term (loss: regression)
    hints: list[HintConfig] = []
    # 'recipe' (the recipe's teacher), 'previous' (the model the previous stage produced), a model spec
    # with a checkpoint, or a list of these (an ensemble).
    teacher: ModelsField = "recipe"
    teacher_weights: Optional[list[Annotated[float, Field(ge=0)]]] = None
    teacher_epoch: Optional[int] = Field(None, ge=1)  # early-stopped teacher: that epoch's checkpoint
    kd_until_epoch: Optional[int] = Field(None, ge=0)  # KD term for epochs 1..k, hard labels after
    cache_teacher: Union[Literal["auto"], bool] = "auto"
    student: ModelField = None  # build a new student of this spec (teacher-assistant chains)

    def trainer_config(self) -> TrainConfig:
        fields = set(TrainConfig.model_fields) - {"loss"}
        return TrainConfig(**self.model_dump(include=fields), loss=self.hard_loss)


def _fit(student: nn.Module, teachers: Sequence[nn.Module], cfg: DistillConfig, data: DataBundle, *,
         path: str, teacher_paths: Optional[list[str]] = None, hooks: Sequence[Hook] = (), **trainer_kwargs) -> dict:
    """Validate, then train ``student`` against ``teachers``; return facts for the report."""
    teacher_paths = teacher_paths or ([f"{path}.teacher"] if len(teachers) == 1 else
                                      [f"{path}.teacher[{j}]" for j in range(len(teachers))])
    if data.task == "lm" and "loss" not in cfg.model_fields_set:  # kl's default, per token for language models
        cfg = cfg.model_copy(update={"loss": "token_kl"})
    weights = teacher_weights(cfg.teacher_weights, len(teachers), path)
    device = resolve_device(cfg.device)
    if cfg.hints and len(teachers) > 1:
        raise RecipeError(f"{path}.hints", f"hints need a single teacher; this stage has {len(teachers)}")
    x = check_kd(student, teachers, data, cfg.loss, path, teacher_paths, device, "alpha" in cfg.model_fields_set)
    reason = cache_reason(_augments(cfg), data, bool(cfg.hints))
    if cfg.cache_teacher is True and reason:
        raise RecipeError(f"{path}.cache_teacher", f"is true but {reason}")
    use_cache = cfg.cache_teacher is not False and reason is None
    with frozen(teachers):
        hook = DistillHook(student, teachers, cfg, weights, x, path)
        try:
            hook.adapters.to(device)
            train_data = data
            if use_cache:
                hook.build_cache(data, device)
                train_data = dataclasses.replace(data, train=IndexedDataset(data.train))
            Trainer(student, cfg.trainer_config(), train_data, [hook, *hooks], **trainer_kwargs).fit()
        finally:
            hook.close()
    facts = {"kd_loss": cfg.loss, "temperature": cfg.temperature, "alpha": cfg.alpha, "teachers": len(teachers),
             "teacher_cache": use_cache}
    if not use_cache:  # say why: a silently slower run (teacher forward every step) is a surprise
        facts["teacher_cache_off"] = "cache_teacher is false" if cfg.cache_teacher is False else reason
    return facts


def _augments(cfg: DistillConfig) -> bool:
    return bool(cfg.augment.random_shift or cfg.augment.hflip)


def distill(student: nn.Module, teacher: nn.Module | str | Path | Sequence, config: DistillConfig | None = None,
            data=None, *, hooks: Sequence[Hook] = (), path: str = "distill", **trainer_kwargs) -> Result:
    """Train ``student`` to match ``teacher`` (a model, a checkpoint path, or a list of them: an ensemble).

    ``config.teacher``/``student``/``teacher_epoch`` are recipe options and are ignored here.
    Returns the trained student and its metrics on the test split (val if there is none), plus the
    stage's facts (``teacher_cache``, and ``teacher_cache_off``: why outputs were not cached).
    """
    data = as_data(data)
    cfg = config or DistillConfig()
    trainer_kwargs.setdefault("name", "distill")
    facts = _fit(student, load_teachers(teacher), cfg, data, path=path, hooks=hooks, **trainer_kwargs)
    split = "test" if data.has("test") else "val"
    # the facts say whether teacher outputs were cached, and why not (a user's loaders cannot be indexed)
    return Result(student, {**evaluate(student, data, split, cfg.device), **facts})


# -- the recipe stage ------------------------------------------------------------------------------
def _check_distill(recipe, index: int, cfg: DistillConfig) -> None:
    path = f"stages[{index}].distill"
    items = teacher_items(cfg.teacher, path)
    check_teachers(recipe, items, path, new_student=cfg.student is not None)
    teacher_weights(cfg.teacher_weights, len(items), path)
    if cfg.hints and len(items) > 1:
        raise RecipeError(f"{path}.hints", f"hints need a single teacher; this stage has {len(items)}")
    if cfg.cache_teacher is True and _augments(cfg):
        raise RecipeError(f"{path}.cache_teacher", "is true but the trainer augments the inputs (augment:); "
                                                   "cached teacher outputs would not match the augmented batches")
    if cfg.cache_teacher is True and cfg.hints and getattr(recipe.data, "padding", None) == "longest":
        raise RecipeError(f"{path}.cache_teacher", f"is true but {VARYING_SHAPES}")  # the text dataset's default
    if cfg.teacher_epoch is not None:
        check_teacher_epoch(recipe, index, items, cfg.teacher_epoch, path)


@register_stage("distill", DistillConfig, "knowledge distillation from a frozen teacher (or ensemble) through the shared trainer",
                check=_check_distill)
def run_distill(state, cfg: DistillConfig) -> StageResult:
    path = state.stage.path
    items = teacher_items(cfg.teacher, path)
    teachers = [resolve_teacher(state, item, ipath, cfg.teacher_epoch) for item, ipath in items]
    student = state.model
    if cfg.student is not None:
        from compress.models import create_model

        student = create_model(cfg.student, state.data.input_shape, state.data.num_outputs,
                               data_task=state.data.task)
        check_outputs(student, state.data, f"{path}.student")
    if any(t is student for t in teachers):
        raise RecipeError(f"{path}.teacher", "the teacher is the model being trained; give a new student: spec")
    info = _fit(student, teachers, cfg, state.data, path=path, teacher_paths=[p for _, p in items],
                **state.trainer_kwargs())
    return StageResult(student, facts=dict(info))
