"""The ``train`` stage (supervised training or fine-tuning) and the ``evaluate`` stage."""
from __future__ import annotations

from typing import Literal

from compress.config import StrictModel
from compress.errors import RecipeError
from compress.stages.base import ModelField, StageResult, check_outputs, register_stage
from compress.trainer import TrainConfig, Trainer, evaluate


class TrainStageConfig(TrainConfig):
    target: Literal["model", "teacher"] = "model"  # train the recipe's teacher (first step of a KD chain)
    model: ModelField = None  # start from a fresh model of this spec (replaces the target) instead of the current one


def _check_train(recipe, index: int, cfg: TrainStageConfig) -> None:
    if cfg.target == "teacher" and recipe.teacher is None:
        raise RecipeError(f"stages[{index}].train.target", "is 'teacher' but the recipe has no 'teacher:' section")


@register_stage("train", TrainStageConfig, "supervised training or fine-tuning through the shared trainer", check=_check_train)
def run_train(state, cfg: TrainStageConfig) -> StageResult:
    model, teacher = state.model, state.teacher
    if cfg.model is not None:
        from compress.models import create_model

        fresh = create_model(cfg.model, state.data.input_shape, state.data.num_outputs, data_task=state.data.task)
        check_outputs(fresh, state.data, f"{state.stage.path}.model")
        if cfg.target == "teacher":
            teacher = fresh
        else:
            model = fresh
    trained = teacher if cfg.target == "teacher" else model
    trainer_cfg = TrainConfig(**cfg.model_dump(exclude={"target", "model"}))
    Trainer(trained, trainer_cfg, state.data, **state.trainer_kwargs(f"train:{cfg.target}")).fit()
    if cfg.target == "teacher":  # the row measures what was trained; the student is untouched
        return StageResult(model, teacher=teacher, subject=teacher, facts={"role": "teacher"})
    return StageResult(model)


class EvaluateConfig(StrictModel):
    split: Literal["test", "val", "train"] = "test"
    target: Literal["model", "teacher"] = "model"


@register_stage("evaluate", EvaluateConfig, "measure the current model (or teacher) on a split",
                accepts=("torch", "fakequant", "packed"))
def run_evaluate(state, cfg: EvaluateConfig) -> StageResult:
    model = state.teacher if cfg.target == "teacher" else state.model
    if model is None:
        raise RecipeError(f"{state.stage.path}.target", "is 'teacher' but there is no teacher")
    return StageResult(state.model, subject=model, metrics=evaluate(model, state.data, cfg.split))
