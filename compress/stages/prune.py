"""The ``prune`` stage and ``compress.prune(...)``: iterative magnitude or channel pruning with fine-tuning.

    from compress import prune, PruneConfig
    model, metrics = prune(model, PruneConfig(method="channel", sparsity=0.5, steps=3), data)

Each step raises the target (AGP or linear schedule), prunes, and fine-tunes through the shared
trainer (distilling from the unpruned model by default). Pruning stops early at the first step whose
validation metric falls more than ``max_drop`` below the unpruned model's, fine-tuned and scored the same
way, by more than noise (compress.pruning.gate; that step is undone), or once a params/MACs/latency
``budget`` is met (the step that would pass it by more than 5% is shrunk by bisection).
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn as nn

from compress.api import Result, as_data
from compress.metrics import split_metrics
from compress.errors import RecipeError
from compress.measure.size import count_macs, count_params
from compress.metrics import primary_metric
from compress.pruning import gate, schedules
from compress.pruning.masks import classifier_name, prunable_layers, storage_report
from compress.pruning.methods import PRUNE_METHODS, PruneConfig, PruneKDConfig  # noqa: F401  (PRUNE_METHODS: for plug-ins)
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
            model = create_model(_model_before(recipe, index), data.input_shape, data.num_outputs, data_task=data.task)
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


def _budget_value(kind: str, model: nn.Module, example: torch.Tensor, batch: torch.Tensor, nonzero: bool,
                  cfg: Optional[PruneConfig] = None) -> float:
    own = cfg.measure(kind, model, example) if cfg is not None else None
    if own is not None:
        return own
    if kind == "params":
        return count_params(model)[1] if nonzero else count_params(model)[0]
    if kind == "macs":
        return count_macs(model, example, strict=True)[0]
    from compress import distributed

    return distributed.broadcast_object(torch_latency_ms(model, batch))  # timings differ per rank: rank 0's decide


def _budget_met(b, value: float, base: float) -> bool:
    return value <= b.max if b.max is not None else base / max(value, 1e-12) >= b.reduction


# With a budget and no `sparsity` in the recipe, the schedule goes on past the default sparsity until the budget is
# met, up to this ratio: a transformer whose attention cannot shrink (torchvision's ViT) needs more than half of
# its MLP channels for half the MACs.
BUDGET_CEILING = 0.9
LANDING = 0.05  # a budget lands when the pruned model is at most this much (relatively) past its target


def _budget_landed(b, value: float, base: float) -> bool:
    """Met, and by no more than LANDING: 2.0-2.1x fewer MACs for ``reduction: 2``, 95-100 % of ``max``."""
    if not _budget_met(b, value, base):
        return False
    return value >= b.max * (1 - LANDING) if b.max is not None else base / max(value, 1e-12) <= b.reduction * (1 + LANDING)


def _landing_ratio(pruner, model: nn.Module, t: int, lo: float, hi: float, value_of, b, base: float) -> float:
    """This step's ratio: the schedule's ``hi`` unless pruning that far passes the budget by more than LANDING;
    then bisect between the last kept ratio ``lo`` and ``hi``, each try pruned on a copy, for a ratio that lands
    (or, when widths are too coarse to land, the smallest tried that meets the budget)."""
    def value_at(r: float) -> float:
        m, p = pruner.fork(model)
        p.step(t, r)
        return value_of(m)

    v = value_at(hi)
    if not _budget_met(b, v, base) or _budget_landed(b, v, base):
        return hi
    for _ in range(16):
        mid = (lo + hi) / 2
        v = value_at(mid)
        if _budget_landed(b, v, base):
            return mid
        lo, hi = (lo, mid) if _budget_met(b, v, base) else (mid, hi)
    return hi


def _budget_schedule(cfg: PruneConfig, targets: list[float]) -> PruneConfig:
    """With a budget and no ``sparsity`` in the recipe, ``targets`` goes on past the default sparsity (in place,
    by the schedule's last increment, at least 0.1) up to BUDGET_CEILING; steps stop once the budget is met.
    Returns the config the pruner is built with (its schedule covers the added steps)."""
    if cfg.budget is None or "sparsity" in cfg.model_fields_set or cfg.layer_ratios or cfg.LANDS_BUDGET:
        return cfg
    inc = max(targets[-1] - (targets[-2] if len(targets) > 1 else cfg.initial_sparsity), 0.1)
    while targets[-1] < BUDGET_CEILING - 1e-9:
        targets.append(round(min(BUDGET_CEILING, targets[-1] + inc), 4))
    return cfg.model_copy(update={"sparsity": targets[-1], "steps": len(targets)})


def _default_round_to(cfg: PruneConfig, backends) -> tuple[PruneConfig, dict]:
    """Channel pruning's ``round_to`` when the recipe gives none: what its latency backends are fast at."""
    if "round_to" not in type(cfg).model_fields or cfg.round_to is not None:
        return cfg, ({"round_to": cfg.round_to} if "round_to" in type(cfg).model_fields else {})
    from compress.measure.config import BenchmarkConfig
    from compress.runtime.backends import preferred_round_to

    r, which = preferred_round_to(backends if backends is not None else BenchmarkConfig().backends)
    return cfg.model_copy(update={"round_to": r}), {"round_to": r, "round_to_from": ",".join(which) or "default"}


def _fine_tune_kd(cfg: PruneConfig, teacher, task: str = "classification") -> tuple[Optional[PruneKDConfig], str]:
    """The KD options of the fine-tunes and how the report names them: the ``kd`` block, else self-distillation
    from the unpruned model when the recipe has no teacher (language models: even when it has one, Minitron's
    recipe; the pruned model's own unpruned self matches it more closely than a bigger teacher) and
    ``self_distill`` is on, else plain."""
    if cfg.kd is not None:
        return cfg.kd, f"kd from the {'unpruned model' if cfg.kd.teacher == 'unpruned' else 'recipe teacher'}"
    if cfg.self_distill and (teacher is None or task == "lm"):
        return PruneKDConfig(), "self-distillation from the unpruned model"
    return None, "plain"


def _reference(model: nn.Module, cfg: PruneConfig, data, hooks: list, path: str, tk: dict) -> nn.Module:
    """The gate's reference: a copy of the unpruned model fine-tuned exactly as every step is, so that a step's
    drop is pruning's alone (not the selection of an earlier stage's best epoch on these same samples)."""
    reference = copy.deepcopy(model)
    ref_hooks = [NormPenalty(prunable_layers(reference, cfg.ignored_layers), h.kind, h.strength)
                 if isinstance(h, NormPenalty) else h for h in hooks]
    Trainer(reference, cfg.finetune, data, ref_hooks, name=f"{path}:reference", **tk).fit()
    return reference


def resolve_config(model: nn.Module, cfg: PruneConfig, path: str, backends=None) -> tuple[PruneConfig, dict]:
    """``cfg`` with its defaults that depend on the model filled in (``round_to``, the classifier kept), its
    layer names checked; the stage and ``compress.pruning.Pruner`` both start here."""
    cfg, round_facts = _default_round_to(cfg, backends)
    if cfg.ignored_layers is None:
        head = classifier_name(model)
        cfg = cfg.model_copy(update={"ignored_layers": [head] if head else []})
    check_layer_names(model, cfg, path)
    return cfg, round_facts


# -- the entry point --------------------------------------------------------------------------------------

def prune(model: nn.Module, config: PruneConfig | None = None, data=None, teacher: nn.Module | None = None, *,
          trainer_kwargs: dict | None = None, path: str = "prune", backends: Optional[list[str]] = None) -> Result:
    """Prune ``model`` (changed in place; use the returned one) and fine-tune it after every step.

    ``metrics`` holds the test metrics (val when there is no test split) plus the pruning summary:
    sparsity, params, MACs, storage sizes, the stop reason and one row per step (``steps``). ``backends``:
    the latency backends the model is for (default: the benchmark's), which set channel pruning's round_to.
    """
    cfg, round_facts = resolve_config(model, config or PruneConfig(), path, backends)
    data = as_data(data)
    device = resolve_device(cfg.finetune.device)
    tk = {k: v for k, v in (trainer_kwargs or {}).items() if k not in ("state_path", "name")}
    tk["state_path"] = None  # steps change shapes/masks: a mid-step resume file would not fit; resume is per stage
    metric, mode = primary_metric(data.task)
    split = cfg.eval_split if data.has(cfg.eval_split) else "test"
    example = data.example_input(1).to(device)
    model.to(device)

    base_macs, base_params = count_macs(model, example, strict=True)
    base_nonzero = count_params(model)[1]
    lat_batch = None
    base_budget = None
    if cfg.budget is not None:
        if cfg.budget.kind == "latency":
            lat_batch = data.example_input(cfg.budget.batch_size).to(device)
        base_budget = _budget_value(cfg.budget.kind, model, example, lat_batch, cfg.COUNTS_NONZERO, cfg)

    def budget_of(m: nn.Module) -> float:
        return _budget_value(cfg.budget.kind, m, example, lat_batch, cfg.COUNTS_NONZERO, cfg)

    unpruned = copy.deepcopy(model).eval()
    hooks = []
    kd_cfg, fine_tune = _fine_tune_kd(cfg, teacher, data.task)
    if kd_cfg is not None:  # the loss by name in the report: per-token (chunked) token_kl for language models
        kd_cfg = kd_cfg.resolved(data.task)
    if kd_cfg is not None:
        kd_teacher = unpruned if kd_cfg.teacher == "unpruned" else teacher
        if kd_teacher is None:
            raise RecipeError(f"{path}.kd.teacher", "is 'recipe' but no teacher model was given")
        try:
            hooks.append(kd_hook(model, kd_teacher, kd_cfg, data, path=f"{path}.kd", device=cfg.finetune.device))
        except RecipeError as e:
            if cfg.kd is not None:
                raise
            fine_tune = f"plain (self-distillation cannot apply: {e})"  # a default never fails a recipe
    try:  # the KD hook's teacher must come back unfrozen and the student hook-free, even on an error
        layers = prunable_layers(model, cfg.ignored_layers)
        if cfg.regularize is not None:
            hooks.append(NormPenalty(layers, cfg.regularize.kind, cfg.regularize.strength))
            if cfg.regularize.epochs:
                reg_cfg = cfg.finetune.model_copy(update={"epochs": cfg.regularize.epochs})
                Trainer(model, reg_cfg, data, hooks, name=f"{path}:regularize", **tk).fit()

        ref = gate.score(_reference(model, cfg, data, hooks, path, tk) if cfg.max_drop is not None else model,
                         data, split, device)

        targets = schedules.targets(cfg.schedule, cfg.sparsity, cfg.steps, cfg.initial_sparsity)
        pruner = _budget_schedule(cfg, targets).pruner(model, layers, example, data, path, device)

        history: list[dict] = []
        good = copy.deepcopy(model)
        stop = "schedule finished"
        last = 0.0  # the ratio of the last kept step (bisection's lower end)
        for t, target in enumerate(targets, 1):
            if cfg.budget is not None:
                target = _landing_ratio(pruner, model, t, last, target, budget_of, cfg.budget, base_budget)
            step_hooks = list(hooks) + pruner.step(t, target)
            Trainer(model, cfg.finetune, data, step_hooks, name=f"{path}:step{t}", **tk).fit()
            scores = gate.score(model, data, split, device)
            decision = gate.decide(ref, scores, cfg.max_drop, cfg.significance, mode == "max",
                                   relative=metric in gate.RELATIVE_METRICS)
            macs, params = count_macs(model, example, strict=True)
            nonzero = count_params(model)[1]
            row = {"step": t, "target": round(target, 4), f"{split}_{metric}": scores.value, **decision.facts(),
                   # reported only (the stopping rule never looks at it), for accuracy-vs-sparsity tables
                   **({f"test_{metric}": evaluate(model, data, "test", device)[metric]} if split != "test" and data.has("test") else {}),
                   "weight_sparsity": None, **pruner.step_facts(),
                   "params": params, "nonzero_params": nonzero, "macs": macs, "kept": True}
            history.append(row)
            if decision.undo:
                row["kept"] = False
                where = "above" if decision.relative else "below"
                stop = (f"kept {t - 1} of {len(targets)} steps; step {t} undone: {split} {metric} "
                        f"{decision.why()} {where} the unpruned model's {ref.value:.4f}")
                model = good
                break
            good = copy.deepcopy(model)
            last = target
            if cfg.budget is not None:
                value_b = budget_of(model)
                row["budget_value"] = value_b
                if _budget_met(cfg.budget, value_b, base_budget):
                    stop = f"step {t}: {cfg.budget.kind} budget met"
                    break
        if stop == "schedule finished" and cfg.budget is not None:
            stop = f"schedule finished before the {cfg.budget.kind} budget was met"

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
        "fine_tune": fine_tune,
        "kd_loss": kd_cfg.loss if kd_cfg is not None and not fine_tune.startswith("plain") else None,
        **round_facts,
        "weight_sparsity": None, "channel_ratio": None, **pruner.summary(kept),
        "unpruned_params": base_params, "unpruned_nonzero": base_nonzero, "params": total, "nonzero": nonzero,
        "unpruned_macs": base_macs, "macs": macs, "macs_reduction": round(base_macs / max(macs, 1), 2),
        # the gate's reference: the unpruned model, fine-tuned like every step when max_drop is set
        f"unpruned_{split}_{metric}": ref.value,
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

    bench = state.recipe.benchmark if state.recipe is not None else None
    result = prune(state.model, cfg, state.data, teacher=state.teacher,
                   trainer_kwargs=state.trainer_kwargs("prune"), path=state.stage.path if state.stage else "prune",
                   backends=bench.backends if bench is not None else None)
    _, summary = split_metrics(result.metrics)
    if state.stage_dir is not None:
        write_json(state.stage_dir / "prune_steps.json", summary["steps"])
    summary.pop("steps")
    return StageResult(result.model, facts={k: v for k, v in summary.items() if v is not None})
