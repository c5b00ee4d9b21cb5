"""The ``prune`` stage and ``compress.prune(...)``: iterative magnitude or channel pruning with fine-tuning.

    from compress import prune, PruneConfig
    model, metrics = prune(model, PruneConfig(method="channel", sparsity=0.5, steps=3), data)

Each step raises the target (AGP or linear schedule), prunes, and fine-tunes through the shared
trainer. Pruning stops early at the first step whose validation metric falls more than ``max_drop``
below the unpruned model (that step is undone) or once a params/MACs/latency ``budget`` is met.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from compress.api import Result, as_data
from compress.metrics import split_metrics
from compress.errors import RecipeError
from compress.measure.size import count_macs, count_params
from compress.metrics import primary_metric
from compress.pruning import schedules
from compress.pruning.masks import classifier_name, prunable_layers, storage_report
from compress.pruning.methods import PRUNE_METHODS, PruneConfig  # noqa: F401  (PRUNE_METHODS: for plug-ins)
from compress.pruning.regularizers import NormPenalty
from compress.stages.base import StageResult, register_stage
from compress.registry import did_you_mean
from compress.kd import kd_hook
from compress.runtime.timing import Timer, time_interleaved
from compress.trainer import Trainer, evaluate
from compress.utils import resolve_device

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
    cfg.check_rules(path)
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


def _budget_value(kind: str, model: nn.Module, example: torch.Tensor, batch: torch.Tensor, nonzero: bool) -> float:
    if kind == "params":
        return count_params(model)[1] if nonzero else count_params(model)[0]
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
        base_budget = _budget_value(cfg.budget.kind, model, example, lat_batch, cfg.COUNTS_NONZERO)

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
        pruner = cfg.pruner(model, layers, example, data, path, device)

        history: list[dict] = []
        good = copy.deepcopy(model)
        stop = "schedule finished"
        for t, target in enumerate(targets, 1):
            step_hooks = list(hooks) + pruner.step(t, target)
            Trainer(model, cfg.finetune, data, step_hooks, name=f"{path}:step{t}", **tk).fit()
            value = evaluate(model, data, split, device)[metric]
            macs, params = count_macs(model, example, strict=True)
            nonzero = count_params(model)[1]
            row = {"step": t, "target": round(target, 4), f"{split}_{metric}": value, "drop": sign * (base_val - value),
                   # reported only (the stopping rule never looks at it), for accuracy-vs-sparsity tables
                   **({f"test_{metric}": evaluate(model, data, "test", device)[metric]} if split != "test" and data.has("test") else {}),
                   "weight_sparsity": None, **pruner.step_facts(),
                   "params": params, "nonzero_params": nonzero, "macs": macs, "kept": True}
            history.append(row)
            if cfg.max_drop is not None and row["drop"] > cfg.max_drop:
                row["kept"] = False
                stop = f"step {t}: {split} {metric} fell {row['drop']:.4f} below the unpruned model (max_drop {cfg.max_drop})"
                model = good
                break
            good = copy.deepcopy(model)
            if cfg.budget is not None:
                value_b = _budget_value(cfg.budget.kind, model, example, lat_batch, cfg.COUNTS_NONZERO)
                row["budget_value"] = value_b
                if _budget_met(cfg.budget, value_b, base_budget):
                    stop = f"step {t}: {cfg.budget.kind} budget met"
                    break

        kept = [r for r in history if r["kept"]]
        layers = prunable_layers(model, cfg.ignored_layers)
        fin_hooks = pruner.finish(model, layers, bool(kept))
        if cfg.final_finetune is not None and kept:
            for h in hooks:
                if isinstance(h, NormPenalty):
                    h.layers = layers
            Trainer(model, cfg.final_finetune, data, list(hooks) + fin_hooks, name=f"{path}:final", **tk).fit()
    finally:
        for h in hooks:
            if hasattr(h, "close"):
                h.close()
    pruner.record(model, bool(kept))
    model.zero_grad(set_to_none=True)

    macs, params = count_macs(model, example, strict=True)
    total, nonzero = count_params(model)
    summary = {
        "method": cfg.method,
        "steps_done": len(kept),
        "stop_reason": stop,
        "weight_sparsity": None, "channel_ratio": None, **pruner.summary(kept),
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
