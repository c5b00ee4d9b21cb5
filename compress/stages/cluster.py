"""The ``cluster`` stage and ``compress.cluster(...)``: per-layer k-means weight sharing with centroid
fine-tuning (Deep Compression's second step).

    from compress import cluster, ClusterConfig
    model, metrics = cluster(model, ClusterConfig(bits=5, conv_bits=8, init="linear"), data)

The result is a plain float model whose Conv/Linear weights take at most ``2**bits`` distinct non-zero
values (pruned zeros stay zero), so export, PTQ and every stage that takes a float model still apply;
the ``encode`` stage (``compress.packfile``) is what turns the sharing into a small file.
"""
from __future__ import annotations

from typing import Literal, Optional

import torch.nn as nn
from pydantic import Field

from compress.api import Result, as_data
from compress.config import StrictModel
from compress.errors import RecipeError
from compress.evaluation import evaluate
from compress.kd import KDConfig, kd_hook
from compress.metrics import split_metrics
from compress.quant.cluster import centroid_parameters, cluster_model, clusterable_layers, distinct_nonzero, strip
from compress.stages.base import StageResult, register_stage
from compress.trainer import OptimizerConfig, SchedulerConfig, TrainConfig, Trainer

__all__ = ["ClusterConfig", "cluster"]


class ClusterKDConfig(KDConfig):
    """KD from the recipe's teacher while the centroids are fine-tuned (as in prune and QAT)."""

    alpha: float = Field(0.3, ge=0, le=1)


class ClusterConfig(StrictModel):
    bits: int = Field(5, ge=2, le=8)  # codebook of at most 2**bits entries per layer (the paper: 5 for FC layers)
    conv_bits: Optional[int] = Field(None, ge=2, le=8)  # for convolutions (the paper: 8); default: bits
    init: Literal["linear", "density", "kmeans++"] = "linear"  # the paper finds linear best (keeps large weights)
    exclude: list[str] = []  # layer names left unshared
    train_others: bool = False  # also train biases/norms while fine-tuning (default: only the centroids move)
    finetune: TrainConfig = TrainConfig(epochs=3, optimizer=OptimizerConfig(lr=5e-4), scheduler=SchedulerConfig(name="cosine"))
    kd: Optional[ClusterKDConfig] = None


def _bits_of(model: nn.Module, cfg: ClusterConfig) -> dict[str, int]:
    conv = cfg.conv_bits or cfg.bits
    return {n: (cfg.bits if isinstance(m, nn.Linear) else conv) for n, m in clusterable_layers(model, cfg.exclude).items()}


def cluster(model: nn.Module, config: ClusterConfig | None = None, data=None, teacher: nn.Module | None = None, *,
            trainer_kwargs: dict | None = None, split: str | None = None, path: str = "cluster") -> Result:
    """Share weights of ``model`` in place, fine-tune the codebooks, hand back plain layers; metrics: the
    task metrics on ``split`` plus codebook sizes."""
    cfg = config or ClusterConfig()
    data = as_data(data)
    split = split or ("test" if data.has("test") else "val")
    names = dict(model.named_modules())
    for i, n in enumerate(cfg.exclude):
        if n not in names or n == "":
            raise RecipeError(f"{path}.exclude[{i}]", f"no layer named {n!r} in the model")
    bits = _bits_of(model, cfg)
    if not bits:
        raise RecipeError(path, "the model has no Conv/Linear layer to cluster")
    if cfg.kd is not None and teacher is None:
        raise RecipeError(f"{path}.kd", "needs a teacher model (pass teacher=... or add 'teacher:' to the recipe)")
    seed = (trainer_kwargs or {}).get("seed", 0)
    sizes = cluster_model(model, bits, cfg.init, cfg.exclude, seed=seed)
    centroids = {id(p) for p in centroid_parameters(model)}
    frozen = [p for p in model.parameters() if id(p) not in centroids and p.requires_grad and not cfg.train_others]
    for p in frozen:
        p.requires_grad_(False)
    hooks = []
    if cfg.kd is not None:
        hooks.append(kd_hook(model, teacher, cfg.kd, data, path=f"{path}.kd", teacher_path=f"{path}.kd",
                             device=cfg.finetune.device))
    try:
        if cfg.finetune.epochs > 0:
            Trainer(model, cfg.finetune, data, hooks, **(trainer_kwargs or {"name": "cluster"})).fit()
    finally:
        for h in hooks:
            if hasattr(h, "close"):
                h.close()
        for p in frozen:
            p.requires_grad_(True)
        strip(model)
    model.eval()
    layers = clusterable_layers(model, cfg.exclude)
    facts = {"cluster_bits": cfg.bits, "clustered_layers": len(sizes),
             "max_codebook": max(sizes.values()),
             "distinct_nonzero": {n: distinct_nonzero(m.weight.detach()) for n, m in layers.items()}}
    if cfg.conv_bits:
        facts["cluster_conv_bits"] = cfg.conv_bits
    return Result(model, {**evaluate(model, data, split), **facts})


def _check(recipe, index: int, cfg: ClusterConfig) -> None:
    if cfg.kd is not None and recipe.teacher is None:
        raise RecipeError(f"stages[{index}].cluster.kd", "needs a teacher: the recipe has no 'teacher:' section")


@register_stage("cluster", ClusterConfig, "k-means weight sharing per layer with fine-tuned centroids (Deep Compression)",
                check=_check, accepts=("torch",))
def run_cluster(state, cfg: ClusterConfig) -> StageResult:
    split = state.recipe.benchmark.split if state.recipe and state.recipe.benchmark else "test"
    split = split if state.data.has(split) else "val"
    model, metrics = cluster(state.model, cfg, state.data, state.teacher, trainer_kwargs=state.trainer_kwargs("cluster"),
                             split=split, path=state.stage.path)
    task, facts = split_metrics(metrics)
    return StageResult(model, metrics=task, facts=facts)
