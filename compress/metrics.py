"""Task metrics: top-1/top-5 accuracy for classification, RMSE/MAE for regression (NaN = missing)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE over observed entries only; a NaN target means 'not observed' (recommenders, sparse labels)."""
    mask = ~torch.isnan(target)
    if mask.all():
        return F.mse_loss(pred, target)
    diff = torch.where(mask, pred - torch.nan_to_num(target), torch.zeros_like(pred))
    return diff.pow(2).sum() / mask.sum().clamp_min(1)


LOSSES = {
    "cross_entropy": lambda out, y: F.cross_entropy(out, y),
    "mse": lambda out, y: F.mse_loss(out, y.view_as(out)),
    "masked_mse": lambda out, y: masked_mse(out, y.view_as(out)),
}


def default_loss(task: str) -> str:
    return "cross_entropy" if task == "classification" else "masked_mse"


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
        if self.task == "classification":
            out["accuracy"] = s.get("correct1", 0.0) / n
            out["top5"] = s.get("correct5", 0.0) / n
        else:
            out["rmse"] = (s.get("sq", 0.0) / n) ** 0.5
            out["mae"] = s.get("abs", 0.0) / n
        return out


def primary_metric(task: str) -> tuple[str, str]:
    """The metric a task is judged by and whether higher is better."""
    return ("accuracy", "max") if task == "classification" else ("rmse", "min")


# Keys of a stage's metrics that are task metrics (the rest are facts about the stage for the report).
TASK_METRICS = ("accuracy", "top5", "loss", "rmse", "mae")


def split_metrics(metrics: dict) -> tuple[dict, dict]:
    """(task metrics, everything else) of a stage's metrics."""
    return ({k: v for k, v in metrics.items() if k in TASK_METRICS},
            {k: v for k, v in metrics.items() if k not in TASK_METRICS})
