"""Sensitivity analysis: prune one layer at a time at several ratios and measure the damage.

The table says which layers tolerate pruning; ``suggest_ratios`` turns it into the ``layer_ratios:``
of a prune stage (the largest tested ratio whose drop stays within ``max_drop``).
"""
from __future__ import annotations

import copy
import csv
from pathlib import Path
from typing import Iterable, Optional

import torch.nn as nn
import yaml

from compress.metrics import primary_metric
from compress.pruning.masks import apply_masks, magnitude_masks, prunable_layers
from compress.measure.size import count_macs
from compress.pruning.structured import IMPORTANCES, accumulate_grads, build_pruner
from compress.trainer import evaluate


def analyse(model: nn.Module, data, layers: Optional[Iterable[str]] = None, ratios: Iterable[float] = (0.25, 0.5, 0.75),
            method: str = "channel", importance: str = "l1", split: str = "val",
            ignored: Iterable[str] = ()) -> tuple[float, list[dict]]:
    """(unpruned metric, rows of {layer, ratio, metric, drop, macs}) with each layer pruned alone, no fine-tuning."""
    metric, mode = primary_metric(data.task)
    sign = 1 if mode == "max" else -1
    base = evaluate(model, data, split)[metric]
    example = data.example_input(1)
    names = list(layers) if layers else list(prunable_layers(model, ignored))
    rows = []
    for name in names:
        for r in ratios:
            m = copy.deepcopy(model)
            named = dict(m.named_modules())
            if method == "magnitude":
                target = {name: named[name]}
                apply_masks(target, magnitude_masks(target, r, "layer"))
            else:
                pruner = build_pruner(m, example, importance, 0.0, 1, lambda ratio, steps: [0.0, ratio],
                                      global_pruning=False, ignored=[named[n] for n in ignored if n != name],
                                      layer_ratios={named[name]: r}, max_layer_ratio=1.0)
                if IMPORTANCES.get(importance).extra.get("needs_grad"):
                    accumulate_grads(m, data)
                pruner.step()
            value = evaluate(m, data, split)[metric]
            rows.append({"layer": name, "ratio": r, metric: value, "drop": sign * (base - value),
                         "macs": count_macs(m, example)[0]})
    return base, rows


def suggest_ratios(rows: list[dict], max_drop: float) -> dict[str, float]:
    """Per layer, the largest ratio whose drop is within ``max_drop`` (layers with none are left out)."""
    best: dict[str, float] = {}
    for r in rows:
        if r["drop"] <= max_drop and r["ratio"] > best.get(r["layer"], 0.0):
            best[r["layer"]] = r["ratio"]
    return best


def write_report(base: float, rows: list[dict], out: Path, metric: str, max_drop: float, title: str = "") -> dict[str, Path]:
    """sensitivity.csv, sensitivity.md, sensitivity.png and layer_ratios.yaml in ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = {k: out / f for k, f in (("csv", "sensitivity.csv"), ("md", "sensitivity.md"), ("png", "sensitivity.png"),
                                       ("yaml", "layer_ratios.yaml"))}
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["layer", "ratio", metric, "drop", "macs"])
        w.writeheader()
        w.writerows(rows)
    ratios = sorted({r["ratio"] for r in rows})
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    cell = {(r["layer"], r["ratio"]): r[metric] for r in rows}
    scale = 100 if metric == "accuracy" else 1
    lines = [f"{title}unpruned {metric}: {scale * base:.2f}", "",
             "| layer | " + " | ".join(f"{r:g}" for r in ratios) + " |", "|---|" + "---|" * len(ratios)]
    lines += [f"| {n} | " + " | ".join(f"{scale * cell[(n, r)]:.2f}" for r in ratios) + " |" for n in layers]
    paths["md"].write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(6, 4))
    for n in layers:
        ax.plot(ratios, [scale * cell[(n, r)] for r in ratios], marker="o", label=n)
    ax.axhline(scale * base, color="gray", linestyle="--", linewidth=1, label="unpruned")
    ax.set_xlabel("fraction pruned (this layer only)")
    ax.set_ylabel(metric + (" (%)" if metric == "accuracy" else ""))
    ax.set_title(title.strip() or "pruning sensitivity")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(paths["png"], dpi=120)
    plt.close(fig)
    suggestion = suggest_ratios(rows, max_drop)
    paths["yaml"].write_text(f"# largest tested ratio per layer with a drop <= {max_drop}; paste under a prune stage\n"
                             + yaml.safe_dump({"layer_ratios": suggestion}, sort_keys=False))
    return paths
