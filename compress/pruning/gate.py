"""The prune stage's gate: undo a step only when it is worse than the unpruned model by more than ``max_drop``
*and* by more than the validation set's noise.

Both models are scored on the same samples, so the test is paired: exact McNemar on the samples the two
classify differently (one-sided: is the step wrong where the reference was right more often than chance?).
Regression metrics (RMSE) have no per-sample right/wrong: their gate is ``max_drop`` alone. So has
perplexity (language models), whose gate is ``max_drop`` alone on its *relative* rise, (step - ref) / ref:
0.05 allows 5% higher validation perplexity. Its tokens are not independent samples (McNemar does not apply),
and a paired bootstrap over blocks would cost another pass of both models per step for little: the
validation split is tens of thousands of tokens.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from compress.data.inputs import to_device
from compress.evaluation import evaluate
from compress.metrics import primary_metric


@dataclass
class Scores:
    """One model on the gate's split: its metric and, for classification, which samples it got right."""

    value: float
    hits: Optional[torch.Tensor] = None  # bool per sample, in the split's (unshuffled) order


# Metrics whose gate compares relative change (a perplexity of 80 vs 84 is what 8 vs 8.4 is).
RELATIVE_METRICS = ("perplexity",)


@torch.no_grad()
def score(model: nn.Module, data, split: str, device) -> Scores:
    """The split's primary metric; for classification from one pass that also keeps the per-sample hits
    (top-1 as ``MetricAccumulator`` counts it, so the value equals ``evaluate``'s accuracy)."""
    if data.task != "classification":
        return Scores(evaluate(model, data, split, device)[primary_metric(data.task)[0]])
    was = model.training
    model.eval().to(device)
    hits = []
    for raw in data.loader(split, shuffle=False):
        out = model(to_device(raw[0], device))
        hits.append(out.topk(1, dim=1).indices[:, 0].cpu().eq(raw[1].view(-1)))
    model.train(was)
    h = torch.cat(hits)
    return Scores(h.float().mean().item(), h)


def mcnemar_p(worse: int, better: int) -> float:
    """One-sided exact McNemar p-value: P(X >= worse), X ~ Binomial(worse + better, 1/2).

    Under "the step is no worse", each sample the two models disagree on is equally likely to go either
    way, so the exact test is this binomial tail; ``math.comb`` computes it exactly (no scipy for one sum).
    """
    n = worse + better
    if worse <= 0:
        return 1.0
    return sum(math.comb(n, k) for k in range(worse, n + 1)) / 2 ** n


@dataclass
class GateDecision:
    """Why a step was kept or undone, with the numbers the report shows."""

    undo: bool
    drop: float  # how much worse than the reference (accuracy points as a fraction, RMSE rise, relative perplexity rise)
    max_drop: Optional[float]
    n: int = 0  # samples compared (0: no paired test)
    worse: Optional[int] = None  # right in the reference, wrong after the step
    better: Optional[int] = None  # wrong in the reference, right after the step
    p_value: Optional[float] = None
    significance: float = 0.05
    relative: bool = False  # drop is relative to the reference (perplexity)

    def facts(self) -> dict:
        return {"drop": self.drop, "gate_n": self.n or None, "gate_worse": self.worse, "gate_better": self.better,
                "p_value": None if self.p_value is None else round(self.p_value, 6)}

    def why(self) -> str:
        """The numbers behind the decision, in words."""
        text = (f"rose {100 * self.drop:.2f}% (max_drop {self.max_drop}: relative)" if self.relative else
                f"fell {self.drop:.4f} (max_drop {self.max_drop})")
        if self.p_value is None:
            return text
        return (f"{text} on {self.n} samples: {self.worse} newly wrong vs {self.better} newly right, one-sided exact "
                f"McNemar p={self.p_value:.3g} ({'<' if self.p_value < self.significance else '>='} {self.significance})")


def decide(ref: Scores, step: Scores, max_drop: Optional[float], significance: float = 0.05,
           higher_is_better: bool = True, relative: bool = False) -> GateDecision:
    """Undo the step when its drop exceeds ``max_drop`` and, where samples pair up, McNemar's p < ``significance``.
    ``relative``: the drop is a fraction of the reference's value (perplexity)."""
    drop = (ref.value - step.value) if higher_is_better else (step.value - ref.value)
    if relative:
        drop /= max(abs(ref.value), 1e-12)
    out = GateDecision(undo=False, drop=drop, max_drop=max_drop, significance=significance, relative=relative)
    if ref.hits is not None and step.hits is not None:
        out.n = int(ref.hits.numel())
        out.worse = int((ref.hits & ~step.hits).sum())
        out.better = int((~ref.hits & step.hits).sum())
        out.p_value = mcnemar_p(out.worse, out.better)
    too_far = max_drop is not None and drop > max_drop
    out.undo = too_far and (out.p_value is None or out.p_value < significance)
    return out
