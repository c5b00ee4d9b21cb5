"""Pruning methods: one config class per method, registered by name, each making a ``Pruner`` that the
prune stage's schedule drives (prune a step, fine-tune, measure; stop on ``max_drop`` or a budget).

A new method is one module: a ``PruneConfig`` subclass with its own options and a ``Pruner``.
"""
from __future__ import annotations

import copy
import sys
from typing import Annotated, ClassVar, Literal, Optional

import annotated_types as at
import torch
import torch.nn as nn
from pydantic import Field, ValidationInfo, field_validator, model_validator

from compress.checkpoint_io import record_transform
from compress.config import MethodConfig, StrictModel, rename_keys
from compress.errors import RecipeError
from compress.hooks import Hook
from compress.kd import KDConfig
from compress.pruning import schedules
from compress.pruning.masks import MaskHook, apply_masks, magnitude_masks, weight_sparsity
from compress.pruning.regularizers import RegularizerConfig
from compress.pruning.structured import IMPORTANCES, accumulate_grads, build_pruner, pruned_shapes
from compress.registry import Registry, did_you_mean
from compress.trainer import OptimizerConfig, SchedulerConfig, TrainConfig

Ratio = Annotated[float, at.Ge(0), at.Lt(1)]
PRUNE_METHODS: Registry = Registry("pruning method")


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


class Pruner:
    """One pruning run of a method: what each step does, and what the run leaves behind."""

    def step(self, t: int, target: float) -> list[Hook]:
        """Prune to ``target``; hooks the step's fine-tuning needs (a mask keeper, say)."""
        raise NotImplementedError

    def step_facts(self) -> dict:
        return {}

    def fork(self, model: nn.Module) -> tuple[nn.Module, "Pruner"]:
        """Independent copies of ``model`` and this pruner (bound to it), to try a ratio on (a budget's bisection)."""
        limit = sys.getrecursionlimit()
        sys.setrecursionlimit(max(limit, 20000))  # a deep copy follows a dependency graph's node links recursively
        try:
            return copy.deepcopy((model, self), {id(o): o for o in self.shared()})
        finally:
            sys.setrecursionlimit(limit)

    def shared(self) -> list:
        """What a fork shares instead of copying (the data; what cannot be copied)."""
        return [getattr(self, "data", None)]

    def finish(self, model: nn.Module, layers: dict, kept: bool) -> list[Hook]:
        """After the last kept step (``model`` may be an earlier step's copy): hooks for the final fine-tune."""
        return []

    def record(self, model: nn.Module, kept: bool) -> None:
        """Note on the model what a reload must replay."""

    def summary(self, kept_rows: list[dict]) -> dict:
        return {}


class PruneConfig(MethodConfig):
    """The ``prune`` stage's options; ``method`` picks the concrete class (see ``PRUNE_METHODS``)."""

    METHODS: ClassVar[Registry] = PRUNE_METHODS
    DEFAULT: ClassVar[str] = "magnitude"
    BUDGET_KINDS: ClassVar[tuple[str, ...]] = ("params", "macs", "latency")
    COUNTS_NONZERO: ClassVar[bool] = False  # budgets in params count non-zeros (unstructured) or all
    LANDS_BUDGET: ClassVar[bool] = False  # the method sizes its steps to the budget itself (no schedule extension)

    method: str = "magnitude"
    # Final fraction removed: of the weights (magnitude) or of each layer's channels (channel).
    sparsity: float = Field(0.5, ge=0, lt=1)
    scope: Literal["global", "layer"] = "global"  # rank all layers together, or every layer to the same fraction
    ignored_layers: Optional[list[str]] = None  # module names never pruned; default: the final classifier
    layer_ratios: dict[str, Ratio] = {}  # per-layer fraction (e.g. from `compress sensitivity`), overrides sparsity
    steps: int = Field(1, ge=1)
    schedule: Literal["agp", "linear"] = "agp"
    initial_sparsity: float = Field(0.0, ge=0, lt=1)  # s_i of the AGP formula
    # After every step. 3 epochs of Adam at 3e-4 with a cosine decay: on resnet18 (32 px MNIST, half the MACs,
    # 3 seeds; benchmarks/prune_defaults.py) it lost 0.0-0.2 points where 1 epoch at 1e-3 lost 1.0-5.0.
    finetune: TrainConfig = TrainConfig(epochs=3, optimizer=OptimizerConfig(name="adam", lr=3e-4),
                                        scheduler=SchedulerConfig(name="cosine"))
    final_finetune: Optional[TrainConfig] = None  # once more after the last kept step
    kd: Optional[PruneKDConfig] = None  # fine-tune with a KD loss (old name: distill); `kd: false`: self_distill off
    # With no kd block and no recipe teacher, fine-tune by distilling from the unpruned model (Torch-Pruning's and
    # Minitron's recipe): plain fine-tuning lost 0.85-1.7 points on a pruned resnet18 (issue 25).
    self_distill: bool = True
    regularize: Optional[RegularizerConfig] = None  # L1/L2/group-lasso penalty during this stage's training
    # allowed fall of val accuracy (0.003 = 0.3 points), rise of RMSE, or relative rise of perplexity (0.05 = 5%)
    max_drop: Optional[float] = Field(None, ge=0, lt=1)
    # ...and a step is undone only if its fall is also unlikely to be noise: one-sided exact McNemar p-value on
    # the validation samples below this (classification; 1: max_drop alone). See compress.pruning.gate.
    significance: float = Field(0.05, gt=0, le=1)
    budget: Optional[BudgetConfig] = None
    eval_split: Literal["val", "test"] = "val"  # what the stopping rule looks at

    @model_validator(mode="before")
    @classmethod
    def _old_keys(cls, data, info: ValidationInfo):
        data = rename_keys(data, {"distill": "kd"}, info, "prune")
        if isinstance(data, dict) and isinstance(data.get("kd"), bool):  # `kd: false`: plain; `kd: true`: the defaults
            kd = data["kd"]
            data = {**{k: v for k, v in data.items() if k != "kd"}, **({"kd": {}} if kd else {"self_distill": False})}
        return data

    def check_rules(self, path: str) -> None:
        """Cross-key rules of the method."""
        if self.initial_sparsity >= self.sparsity and self.sparsity > 0:
            raise RecipeError(f"{path}.initial_sparsity", f"must be below sparsity ({self.sparsity}), got {self.initial_sparsity}")
        if self.budget is not None and self.budget.kind not in self.BUDGET_KINDS:
            raise RecipeError(f"{path}.budget.kind", f"'{self.budget.kind}' needs method 'channel': unstructured zeros "
                                                     "do not make dense MACs or latency smaller; use kind 'params'")

    def pruner(self, model: nn.Module, layers: dict, example: torch.Tensor, data, path: str, device) -> Pruner:
        raise NotImplementedError

    def measure(self, kind: str, model: nn.Module, example) -> Optional[float]:
        """The method's own count of a budget ``kind`` (None: the stage's; decoder LMs count MACs per sequence)."""
        return None


def register_prune_method(config: type[PruneConfig], description: str = ""):
    name = config.model_fields["method"].default
    PRUNE_METHODS.register(name, config=config, description=description or (config.__doc__ or "").strip())(config)
    return config


# -- magnitude (unstructured) ---------------------------------------------------------------------------

class MagnitudeConfig(PruneConfig):
    """Unstructured: zero the smallest weights (global or per layer); the zeros stay zero while fine-tuning."""

    method: Literal["magnitude"] = "magnitude"
    BUDGET_KINDS: ClassVar[tuple[str, ...]] = ("params",)
    COUNTS_NONZERO: ClassVar[bool] = True

    def pruner(self, model, layers, example, data, path, device) -> Pruner:
        return _MagnitudePruner(self, layers)


class _MagnitudePruner(Pruner):
    def __init__(self, cfg: MagnitudeConfig, layers: dict):
        self.cfg, self.layers, self.masks = cfg, layers, {}

    def step(self, t, target):
        frac = target / self.cfg.sparsity if self.cfg.sparsity else 0.0
        self.masks = magnitude_masks(self.layers, target, self.cfg.scope,
                                     {n: r * frac for n, r in self.cfg.layer_ratios.items()})
        apply_masks(self.layers, self.masks)
        return [MaskHook(self.layers, self.masks)]

    def step_facts(self):
        return {"weight_sparsity": weight_sparsity(self.layers)}

    def finish(self, model, layers, kept):
        self.layers = layers
        if kept:
            self.masks = {n: m.weight != 0 for n, m in layers.items()}  # the kept step's zeros, now permanent
        return [MaskHook(layers, self.masks)]

    def summary(self, kept_rows):
        return {"weight_sparsity": round(weight_sparsity(self.layers), 4)}


register_prune_method(MagnitudeConfig)


# -- channel (structured, torch-pruning) ------------------------------------------------------------------

class ChannelConfig(PruneConfig):
    """Structured: remove whole channels through torch-pruning's dependency graph; the model really shrinks."""

    method: Literal["channel"] = "channel"
    # Every layer to the same fraction: at equal MACs (a 2x budget) it ran as fast as or faster than global
    # ranking in ONNX Runtime on the model matrix (batch 32: resnet18 1.89x vs 1.83x, mobilenet_v3_small 1.62x
    # vs 1.37x, convnext_atto 1.72x vs 1.75x; benchmarks/model_matrix.py --defaults --scope ...).
    scope: Literal["global", "layer"] = "layer"
    importance: str = "l1"  # channel ranking: l1, l2, taylor, bn_scale (compress.pruning.structured.IMPORTANCES)
    # Keep channel counts multiples of this; default: what the latency backends are fast at (their
    # preferred_round_to in compress.runtime.backends: 8 with ONNX Runtime among benchmark.backends).
    round_to: Optional[int] = Field(None, ge=1)
    max_layer_ratio: float = Field(0.9, gt=0, le=1)  # no layer loses more than this fraction of its channels

    @field_validator("importance")
    @classmethod
    def _known_importance(cls, v: str) -> str:
        if v not in IMPORTANCES:
            names = IMPORTANCES.names()
            raise ValueError(f"unknown importance '{v}'; expected one of {', '.join(names)}{did_you_mean(v, names)}")
        return v

    def pruner(self, model, layers, example, data, path, device) -> Pruner:
        entry = IMPORTANCES.get(self.importance)
        if entry.extra.get("needs_bn") and not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            raise RecipeError(f"{path}.importance", "'bn_scale' ranks channels by BatchNorm scales, but the model has no BatchNorm")
        named = dict(model.named_modules())
        tp_pruner = build_pruner(
            model, example, self.importance, self.sparsity, self.steps, schedules.tp_scheduler(self.schedule, self.initial_sparsity),
            global_pruning=self.scope == "global", ignored=[named[n] for n in self.ignored_layers],
            layer_ratios={named[n]: r for n, r in self.layer_ratios.items()}, round_to=self.round_to,
            max_layer_ratio=self.max_layer_ratio)
        return _ChannelPruner(self, model, tp_pruner, data, device)


class _ChannelPruner(Pruner):
    def __init__(self, cfg: ChannelConfig, model, tp_pruner, data, device):
        self.cfg, self.model, self.tp, self.data, self.device = cfg, model, tp_pruner, data, device

    def step(self, t, target):
        if IMPORTANCES.get(self.cfg.importance).extra.get("needs_grad"):
            accumulate_grads(self.model, self.data, device=self.device)
        # torch-pruning's schedule holds each step's cumulative ratio: this step's becomes ``target`` (a budget's
        # bisection may ask for less than the schedule), per-layer ratios and head ratios scaled alike.
        k, frac = self.tp.current_step + 1, target / self.cfg.sparsity if self.cfg.sparsity else 0.0
        for ratios in [self.tp.per_step_pruning_ratio, self.tp.per_step_head_pruning_ratio,
                       *self.tp.pruning_ratio_dict.values()]:
            if k < len(ratios):
                ratios[k] = ratios[-1] * frac
        self.tp.step()
        self.model.zero_grad(set_to_none=True)
        return []

    def shared(self):
        # The graph keeps torch-pruning's ops module and the traced autograd nodes (no copy can take those) and
        # its per-layer-type pruning functions (importances recognise them by identity: copies would rank nothing).
        dg = self.tp.DG
        return [self.data, dg.ops, *(n.grad_fn for n in dg.module2node.values()),
                *dg.REGISTERED_PRUNERS.values(), *dg.CUSTOMIZED_PRUNERS.values()]

    def record(self, model, kept):
        if kept:  # each prune stage records its shapes; replayed in order, the last wins
            record_transform(model, "channel_prune", shapes=pruned_shapes(model))

    def summary(self, kept_rows):
        return {"channel_ratio": kept_rows[-1]["target"] if kept_rows else None}


register_prune_method(ChannelConfig)
