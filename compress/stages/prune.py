"""The ``prune`` stage and ``compress.prune(...)``: iterative magnitude or channel pruning with fine-tuning.

    from compress import prune, PruneConfig
    model, metrics = prune(model, PruneConfig(method="channel", sparsity=0.5, steps=3), data)

Each step raises the target (AGP or linear schedule), prunes, and fine-tunes through the shared
trainer. Pruning stops early at the first step whose validation metric falls more than ``max_drop``
below the unpruned model (that step is undone) or once a params/MACs/latency ``budget`` is met.
"""
from __future__ import annotations

import copy
from typing import Annotated, Literal, Optional

import annotated_types as at
import torch
import torch.nn as nn
from pydantic import Field, ValidationInfo, field_validator, model_validator

from compress.api import Result, as_data
from compress.checkpoint import record_transform
from compress.config import StrictModel, rename_keys
from compress.metrics import split_metrics
from compress.errors import RecipeError
from compress.measure.size import count_macs, count_params
from compress.metrics import primary_metric
from compress.pruning import schedules
from compress.pruning.masks import (MaskHook, apply_masks, classifier_name, magnitude_masks, prunable_layers,
                                    storage_report, weight_sparsity)
from compress.pruning.regularizers import NormPenalty, RegularizerConfig
from compress.pruning.structured import IMPORTANCES, accumulate_grads, build_pruner, pruned_shapes
from compress.stages.base import StageResult, register_stage
from compress.registry import did_you_mean
from compress.kd import KDConfig, kd_hook
from compress.runtime.timing import Timer, time_interleaved
from compress.trainer import TrainConfig, Trainer, evaluate
from compress.utils import resolve_device

Ratio = Annotated[float, at.Ge(0), at.Lt(1)]


class PruneKDConfig(KDConfig):
    teacher: Literal["unpruned", "recipe"] = "unpruned"  # the model before this stage, or the recipe's teacher


class BudgetConfig(StrictModel):
    """Stop once the pruned model fits: ``{kind: macs, reduction: 4}`` or ``{kind: params, max: 50000}``."""

    kind: Literal["params", "macs", "latency"]
    max: Optional[float] = Field(None, gt=0)  # parameters (non-zero for magnitude), MACs, or ms per batch
    reduction: Optional[float] = Field(None, gt=1)  # or: this many times fewer/faster than the unpruned model
    batch_size: int = Field(32, ge=1)  # latency is the median PyTorch CPU forward time at this batch size

    @model_validator(mode="after")
    def _one_target(self):
        if (self.max is None) == (self.reduction is None):
            raise ValueError("give exactly one of 'max' (absolute) or 'reduction' (times smaller than the unpruned model)")
        return self


class PruneConfig(StrictModel):
    method: Literal["magnitude", "channel"] = "magnitude"
    # Final fraction removed: of the weights (magnitude) or of each layer's channels (channel).
    sparsity: float = Field(0.5, ge=0, lt=1)
    scope: Literal["global", "layer"] = "global"  # rank all layers together, or every layer to the same fraction
    importance: str = "l1"  # channel ranking: l1, l2, taylor, bn_scale (compress.pruning.structured.IMPORTANCES)
    ignored_layers: Optional[list[str]] = None  # module names never pruned; default: the final classifier
    layer_ratios: dict[str, Ratio] = {}  # per-layer fraction (e.g. from `compress sensitivity`), overrides sparsity
    round_to: Optional[int] = Field(None, ge=1)  # keep channel counts multiples of this (channel only)
    max_layer_ratio: float = Field(0.9, gt=0, le=1)  # no layer loses more than this fraction of its channels
    steps: int = Field(1, ge=1)
    schedule: Literal["agp", "linear"] = "agp"
    initial_sparsity: float = Field(0.0, ge=0, lt=1)  # s_i of the AGP formula
    finetune: TrainConfig = TrainConfig(epochs=1)  # after every step
    final_finetune: Optional[TrainConfig] = None  # once more after the last kept step
    kd: Optional[PruneKDConfig] = None  # fine-tune with a KD loss from the unpruned model (old name: distill)
    regularize: Optional[RegularizerConfig] = None  # L1/L2/group-lasso penalty during this stage's training
    max_drop: Optional[float] = Field(None, ge=0, lt=1)  # allowed fall of val accuracy (0.003 = 0.3 points) or rise of RMSE
    budget: Optional[BudgetConfig] = None
    eval_split: Literal["val", "test"] = "val"  # what the stopping rule looks at

    @model_validator(mode="before")
    @classmethod
    def _old_keys(cls, data, info: ValidationInfo):
        return rename_keys(data, {"distill": "kd"}, info, "prune")

    @field_validator("importance")
    @classmethod
    def _known_importance(cls, v: str) -> str:
        if v not in IMPORTANCES:
            names = IMPORTANCES.names()
            raise ValueError(f"unknown importance '{v}'; expected one of {', '.join(names)}{did_you_mean(v, names)}")
        return v


# -- validation against the model -----------------------------------------------------------------------

def check_layer_names(model: nn.Module, cfg: PruneConfig, path: str) -> None:
    """Every named layer must exist; the message lists what does."""
    names = dict(model.named_modules())
    layers = list(prunable_layers(model))

    def check(name: str, where: str) -> None:
        if name not in names or name == "":
            raise RecipeError(where, f"no layer named '{name}' in the model; prunable layers are "
                                     f"{', '.join(layers)}{did_you_mean(name, layers)}")

    for i, n in enumerate(cfg.ignored_layers or []):
        check(n, f"{path}.ignored_layers[{i}]")
    for n in cfg.layer_ratios:
        check(n, f"{path}.layer_ratios.{n}")


def _model_before(recipe, index: int):
    """The model spec a stage at ``index`` starts from: the last earlier stage that set a fresh one."""
    from compress.models.registry import ModelSpec

    spec = recipe.model
    for s in recipe.stages[:index]:
        for key in ("model", "student"):
            v = getattr(s.config, key, None)
            if isinstance(v, ModelSpec) and getattr(s.config, "target", "model") == "model":
                spec = v
    return spec


def _check_prune(recipe, index: int, cfg: PruneConfig) -> None:
    path = f"stages[{index}].prune"
    if cfg.initial_sparsity >= cfg.sparsity and cfg.sparsity > 0:
        raise RecipeError(f"{path}.initial_sparsity", f"must be below sparsity ({cfg.sparsity}), got {cfg.initial_sparsity}")
    if cfg.budget is not None and cfg.method == "magnitude" and cfg.budget.kind != "params":
        raise RecipeError(f"{path}.budget.kind", f"'{cfg.budget.kind}' needs method 'channel': unstructured zeros "
                                                 "do not make dense MACs or latency smaller; use kind 'params'")
    if cfg.kd is not None and cfg.kd.teacher == "recipe" and recipe.teacher is None:
        raise RecipeError(f"{path}.kd.teacher", "is 'recipe' but the recipe has no 'teacher:' section")
    if cfg.ignored_layers or cfg.layer_ratios:
        # Layer names need the real model: build it (cheap for the models pruning targets) to check them now,
        # before anything is written. If data or model cannot be built, build_state reports that instead.
        from compress.data import create_data
        from compress.models import create_model

        try:
            data = create_data(recipe.data)
            model = create_model(_model_before(recipe, index), data.input_shape, data.num_outputs)
        except Exception:
            return
        check_layer_names(model, cfg, path)


# -- measuring --------------------------------------------------------------------------------------------

@torch.no_grad()
def torch_latency_ms(model: nn.Module, x: torch.Tensor, runs: int = 30, warmup: int = 5) -> float:
    """Median PyTorch CPU forward time in ms (for the latency budget; benchmarks use ONNX Runtime):
    ``warmup`` calls, then ``runs`` single calls on the wall clock."""
    was = model.training
    model.eval()
    res = time_interleaved({"model": Timer(lambda: model(x))}, runs, warmup, clock="wall", reps=1)
    model.train(was)
    return res["model"]["median_ms"]


def _budget_value(kind: str, model: nn.Module, example: torch.Tensor, batch: torch.Tensor, method: str) -> float:
    if kind == "params":
        return count_params(model)[1] if method == "magnitude" else count_params(model)[0]
    if kind == "macs":
        return count_macs(model, example, strict=True)[0]
    from compress import distributed

    return distributed.broadcast_object(torch_latency_ms(model, batch))  # timings differ per rank: rank 0's decide


def _budget_met(b, value: float, base: float) -> bool:
    return value <= b.max if b.max is not None else base / max(value, 1e-12) >= b.reduction


# -- the entry point --------------------------------------------------------------------------------------

def prune(model: nn.Module, config: PruneConfig | None = None, data=None, teacher: nn.Module | None = None, *,
          trainer_kwargs: dict | None = None, path: str = "prune") -> Result:
    """Prune ``model`` (changed in place; use the returned one) and fine-tune it after every step.

    ``metrics`` holds the test metrics (val when there is no test split) plus the pruning summary:
    sparsity, params, MACs, storage sizes, the stop reason and one row per step (``steps``).
    """
    cfg = config or PruneConfig()
    data = as_data(data)
    device = resolve_device(cfg.finetune.device)
    tk = {k: v for k, v in (trainer_kwargs or {}).items() if k not in ("state_path", "name")}
    tk["state_path"] = None  # steps change shapes/masks: a mid-step resume file would not fit; resume is per stage
    if cfg.ignored_layers is None:
        head = classifier_name(model)
        cfg = cfg.model_copy(update={"ignored_layers": [head] if head else []})
    check_layer_names(model, cfg, path)
    metric, mode = primary_metric(data.task)
    split = cfg.eval_split if data.has(cfg.eval_split) else "test"
    sign = 1 if mode == "max" else -1  # drop = how much worse than the unpruned model
    example = data.example_input(1).to(device)
    model.to(device)

    base_val = evaluate(model, data, split, device)[metric]
    base_macs, base_params = count_macs(model, example, strict=True)
    base_nonzero = count_params(model)[1]
    lat_batch = None
    base_budget = None
    if cfg.budget is not None:
        if cfg.budget.kind == "latency":
            lat_batch = data.example_input(cfg.budget.batch_size).to(device)
        base_budget = _budget_value(cfg.budget.kind, model, example, lat_batch, cfg.method)

    unpruned = copy.deepcopy(model).eval()
    hooks = []
    if cfg.kd is not None:
        kd_teacher = unpruned if cfg.kd.teacher == "unpruned" else teacher
        if kd_teacher is None:
            raise RecipeError(f"{path}.kd.teacher", "is 'recipe' but no teacher model was given")
        hooks.append(kd_hook(model, kd_teacher, cfg.kd, data, path=f"{path}.kd", device=cfg.finetune.device))
    try:  # the KD hook's teacher must come back unfrozen and the student hook-free, even on an error
        layers = prunable_layers(model, cfg.ignored_layers)
        if cfg.regularize is not None:
            hooks.append(NormPenalty(layers, cfg.regularize.kind, cfg.regularize.strength))
            if cfg.regularize.epochs:
                reg_cfg = cfg.finetune.model_copy(update={"epochs": cfg.regularize.epochs})
                Trainer(model, reg_cfg, data, hooks, name=f"{path}:regularize", **tk).fit()

        targets = schedules.targets(cfg.schedule, cfg.sparsity, cfg.steps, cfg.initial_sparsity)
        pruner = None
        if cfg.method == "channel":
            entry = IMPORTANCES.get(cfg.importance)
            if entry.extra.get("needs_bn") and not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
                raise RecipeError(f"{path}.importance", "'bn_scale' ranks channels by BatchNorm scales, but the model has no BatchNorm")
            named = dict(model.named_modules())
            pruner = build_pruner(
                model, example, cfg.importance, cfg.sparsity, cfg.steps, schedules.tp_scheduler(cfg.schedule, cfg.initial_sparsity),
                global_pruning=cfg.scope == "global", ignored=[named[n] for n in cfg.ignored_layers],
                layer_ratios={named[n]: r for n, r in cfg.layer_ratios.items()}, round_to=cfg.round_to,
                max_layer_ratio=cfg.max_layer_ratio)

        history: list[dict] = []
        good = copy.deepcopy(model)
        masks: dict = {}
        stop = "schedule finished"
        for t, target in enumerate(targets, 1):
            step_hooks = list(hooks)
            if cfg.method == "magnitude":
                frac = target / cfg.sparsity if cfg.sparsity else 0.0
                masks = magnitude_masks(layers, target, cfg.scope, {n: r * frac for n, r in cfg.layer_ratios.items()})
                apply_masks(layers, masks)
                step_hooks.append(MaskHook(layers, masks))
            else:
                if IMPORTANCES.get(cfg.importance).extra.get("needs_grad"):
                    accumulate_grads(model, data, device=device)
                pruner.step()
                model.zero_grad(set_to_none=True)
            Trainer(model, cfg.finetune, data, step_hooks, name=f"{path}:step{t}", **tk).fit()
            value = evaluate(model, data, split, device)[metric]
            macs, params = count_macs(model, example, strict=True)
            nonzero = count_params(model)[1]
            row = {"step": t, "target": round(target, 4), f"{split}_{metric}": value, "drop": sign * (base_val - value),
                   # reported only (the stopping rule never looks at it), for accuracy-vs-sparsity tables
                   **({f"test_{metric}": evaluate(model, data, "test", device)[metric]} if split != "test" and data.has("test") else {}),
                   "weight_sparsity": weight_sparsity(layers) if cfg.method == "magnitude" else None,
                   "params": params, "nonzero_params": nonzero, "macs": macs, "kept": True}
            history.append(row)
            if cfg.max_drop is not None and row["drop"] > cfg.max_drop:
                row["kept"] = False
                stop = f"step {t}: {split} {metric} fell {row['drop']:.4f} below the unpruned model (max_drop {cfg.max_drop})"
                model = good
                break
            good = copy.deepcopy(model)
            if cfg.budget is not None:
                value_b = _budget_value(cfg.budget.kind, model, example, lat_batch, cfg.method)
                row["budget_value"] = value_b
                if _budget_met(cfg.budget, value_b, base_budget):
                    stop = f"step {t}: {cfg.budget.kind} budget met"
                    break

        kept = [r for r in history if r["kept"]]
        layers = prunable_layers(model, cfg.ignored_layers)
        if cfg.method == "magnitude" and kept:
            masks = {n: m.weight != 0 for n, m in layers.items()}  # the kept step's zeros, now permanent
        if cfg.final_finetune is not None and kept:
            fin_hooks = list(hooks) + ([MaskHook(layers, masks)] if cfg.method == "magnitude" else [])
            for h in fin_hooks:
                if isinstance(h, NormPenalty):
                    h.layers = layers
            Trainer(model, cfg.final_finetune, data, fin_hooks, name=f"{path}:final", **tk).fit()
    finally:
        for h in hooks:
            if hasattr(h, "close"):
                h.close()
    if cfg.method == "channel" and kept:  # each prune stage records its shapes; replayed in order, the last wins
        record_transform(model, "channel_prune", shapes=pruned_shapes(model))
    model.zero_grad(set_to_none=True)

    macs, params = count_macs(model, example, strict=True)
    total, nonzero = count_params(model)
    summary = {
        "method": cfg.method,
        "steps_done": len(kept),
        "stop_reason": stop,
        "weight_sparsity": round(weight_sparsity(layers), 4) if cfg.method == "magnitude" else None,
        "channel_ratio": kept[-1]["target"] if (cfg.method == "channel" and kept) else None,
        "unpruned_params": base_params, "unpruned_nonzero": base_nonzero, "params": total, "nonzero": nonzero,
        "unpruned_macs": base_macs, "macs": macs, "macs_reduction": round(base_macs / max(macs, 1), 2),
        f"unpruned_{split}_{metric}": base_val,
        **storage_report(model),
        "steps": history,
    }
    eval_split = "test" if data.has("test") else "val"
    return Result(model, {**evaluate(model, data, eval_split, device), **summary})


# -- the stage --------------------------------------------------------------------------------------------

@register_stage("prune", PruneConfig, "iterative magnitude (unstructured) or channel (torch-pruning) pruning with fine-tuning",
                check=_check_prune, accepts=("torch",))
def run_prune(state, cfg: PruneConfig) -> StageResult:
    from compress.utils import write_json

    result = prune(state.model, cfg, state.data, teacher=state.teacher,
                   trainer_kwargs=state.trainer_kwargs("prune"), path=state.stage.path if state.stage else "prune")
    _, summary = split_metrics(result.metrics)
    if state.stage_dir is not None:
        write_json(state.stage_dir / "prune_steps.json", summary["steps"])
    summary.pop("steps")
    return StageResult(result.model, facts={k: v for k, v in summary.items() if v is not None})
