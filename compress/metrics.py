"""Task metrics: top-1/top-5 accuracy for classification, RMSE/MAE for regression (NaN = missing),
perplexity and next-token accuracy for language models (``lm``)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def masked_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE over observed entries only; a NaN target means 'not observed' (recommenders, sparse labels)."""
    mask = ~torch.isnan(target)
    if mask.all():
        return F.mse_loss(pred, target)
    diff = torch.where(mask, pred - torch.nan_to_num(target), torch.zeros_like(pred))
    return diff.pow(2).sum() / mask.sum().clamp_min(1)


IGNORE_INDEX = -100  # an lm target that is padding (compress.data.lm.IGNORE)


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over every real target (``[B, T, V]`` logits, ``[B, T]`` targets)."""
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index=IGNORE_INDEX)


LOSSES = {
    "cross_entropy": lambda out, y: F.cross_entropy(out, y),
    "token_cross_entropy": token_cross_entropy,
    "mse": lambda out, y: F.mse_loss(out, y.view_as(out)),
    "masked_mse": lambda out, y: masked_mse(out, y.view_as(out)),
}


def default_loss(task: str) -> str:
    return {"classification": "cross_entropy", "lm": "token_cross_entropy"}.get(task, "masked_mse")


class MetricAccumulator:
    """Sums per-batch statistics so one epoch's metrics cost one sync at the end."""

    def __init__(self, task: str):
        self.task = task
        self.n = 0
        self.stats: dict[str, torch.Tensor | float] = {}

    def _add(self, key: str, value):
        self.stats[key] = self.stats.get(key, 0.0) + value

    @torch.no_grad()
    def update(self, outputs: torch.Tensor, targets: torch.Tensor, loss: torch.Tensor | None = None) -> None:
        if self.task == "lm":  # summed NLL in float64: the perplexity is of every token, not a mean of batch means
            t = targets.reshape(-1)
            real = t != IGNORE_INDEX
            flat = outputs.reshape(-1, outputs.shape[-1])
            self._add("nll", F.cross_entropy(flat.float(), t, ignore_index=IGNORE_INDEX, reduction="sum").double())
            self._add("correct1", (flat.argmax(-1).eq(t) & real).sum())
            self.n += int(real.sum())
            return
        if self.task == "classification":
            n = targets.shape[0]
            k = min(5, outputs.shape[1])
            topk = outputs.topk(k, dim=1).indices
            hit = topk.eq(targets.view(-1, 1))
            self._add("correct1", hit[:, 0].sum())
            self._add("correct5", hit.any(dim=1).sum())
        else:
            t = targets.view_as(outputs)
            mask = ~torch.isnan(t)
            diff = torch.where(mask, outputs - torch.nan_to_num(t), torch.zeros_like(outputs))
            n = int(mask.sum())
            self._add("sq", diff.pow(2).sum())
            self._add("abs", diff.abs().sum())
        if loss is not None:
            self._add("loss", loss.detach() * n)
        self.n += n

    def all_reduce(self) -> "MetricAccumulator":
        """Sum the statistics of every rank (one collective), so every rank computes the same metrics."""
        from compress import distributed

        if not distributed.active():
            return self
        keys = sorted(self.stats)
        dev = next((v.device for v in self.stats.values() if isinstance(v, torch.Tensor)), torch.device("cpu"))
        t = torch.tensor([float(self.n)] + [float(self.stats[k]) for k in keys], dtype=torch.float64, device=dev)
        distributed.all_reduce_(t)
        self.n = int(t[0].item())
        self.stats = {k: float(v) for k, v in zip(keys, t[1:].tolist())}
        return self

    def compute(self) -> dict[str, float]:
        n = max(self.n, 1)
        s = {k: float(v) for k, v in self.stats.items()}
        out: dict[str, float] = {}
        if "loss" in s:
            out["loss"] = s["loss"] / n
        if self.task == "lm":
            nll = s.get("nll", 0.0) / n
            out.update(loss=nll, perplexity=math.exp(min(nll, 700.0)), accuracy=s.get("correct1", 0.0) / n)
            return out
        if self.task == "classification":
            out["accuracy"] = s.get("correct1", 0.0) / n
            out["top5"] = s.get("correct5", 0.0) / n
        else:
            out["rmse"] = (s.get("sq", 0.0) / n) ** 0.5
            out["mae"] = s.get("abs", 0.0) / n
        return out


def primary_metric(task: str) -> tuple[str, str]:
    """The metric a task is judged by and whether higher is better.

    ``lm``: perplexity, exp of the mean token negative log-likelihood over every target token of the split
    (its non-overlapping blocks, ``compress.data.lm``): one mean over tokens, not a mean of per-block
    perplexities. ``accuracy`` is then next-token accuracy (the argmax is the next token)."""
    return {"classification": ("accuracy", "max"), "lm": ("perplexity", "min")}.get(task, ("rmse", "min"))


# Keys of a stage's metrics that are task metrics (the rest are facts about the stage for the report).
TASK_METRICS = ("accuracy", "top5", "loss", "rmse", "mae", "perplexity")


def split_metrics(metrics: dict) -> tuple[dict, dict]:
    """(task metrics, everything else) of a stage's metrics."""
    return ({k: v for k, v in metrics.items() if k in TASK_METRICS},
            {k: v for k, v in metrics.items() if k not in TASK_METRICS})
