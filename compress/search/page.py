"""``search.html``: the trials, the Pareto front and the constraint lines (accuracy vs latency, vs size)."""
from __future__ import annotations

from pathlib import Path

from compress.report import _png, render_page, text_labels
from compress.utils import write_text


def _plot(res, cfg, cost: str, xlabel: str):
    from matplotlib.figure import Figure

    full = [r for r in res.rows if r["fidelity"] == "full" and r.get(cost) is not None]
    low = [r for r in res.rows if r["fidelity"] == "low" and r.get(cost) is not None]
    if not full and not low:
        return None
    fig = Figure(figsize=(7, 4.5), layout="tight")
    ax = fig.add_subplot()
    scale = 100 if res.baseline.get("higher_better") else 1
    if low:
        ax.scatter([r[cost] for r in low], [r["accuracy"] * scale for r in low], s=18, c="lightgray", label="short fine-tune only")
    ax.scatter([r[cost] for r in full], [r["accuracy"] * scale for r in full], s=30, c="tab:blue", label="full budget")
    front = sorted((r for r in res.front if r.get(cost) is not None), key=lambda r: r[cost])
    if front:
        ax.scatter([r[cost] for r in front], [r["accuracy"] * scale for r in front], s=120, facecolors="none",
                   edgecolors="tab:red", label="Pareto front")
    for r in res.closest:
        if r.get(cost) is not None:
            ax.annotate(f"trial {r['trial']}", (r[cost], r["accuracy"] * scale), fontsize=8)
    if res.chosen and res.chosen.get(cost) is not None:
        ax.scatter([res.chosen[cost]], [res.chosen["accuracy"] * scale], marker="*", s=260, c="gold", edgecolors="k",
                   zorder=5, label=f"chosen (trial {res.chosen['trial']})")
    if res.compare and res.compare["val"].get(cost) is not None:
        v = res.compare["val"]
        ax.scatter([v[cost]], [v["accuracy"] * scale], marker="D", s=80, c="tab:green", zorder=5, label="hand-written recipe")
    c = cfg.constraints
    if c.max_drop is not None:
        sign = 1 if res.baseline.get("higher_better") else -1
        ax.axhline((res.baseline["accuracy"] - sign * c.max_drop) * scale, color="tab:orange", ls="--", label="max_drop")
    if cost == "latency" and c.speedup and full and full[0].get("baseline_latency"):
        ax.axvline(full[0]["baseline_latency"] / c.speedup, color="tab:purple", ls="--", label=f"{c.speedup:g}x speedup")
    if cost == "latency" and c.max_latency_ms:
        ax.axvline(c.max_latency_ms, color="tab:purple", ls=":", label="max_latency_ms")
    if cost == "size" and c.max_size:
        ax.axvline(c.max_size, color="tab:purple", ls=":", label="max_size")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"validation {res.baseline.get('metric', 'accuracy')}" + (" (%)" if scale == 100 else ""))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def write_page(res, cfg, path: Path) -> Path:
    """The page, every value from the study escaped (rows, messages and paths are data, not markup)."""
    b = cfg.backend
    with text_labels():
        plots = [_plot(res, cfg, "latency", f"{b.name} latency at batch {b.batch_size} (ms)"),
                 _plot(res, cfg, "size", "deployable file size (bytes)")]
    keys = ["trial", "fidelity", "accuracy", "latency", "speedup", "size", "feasible", "misses", "params"]
    ex = getattr(res, "explain", None) or {}
    imp, table = ex.get("importance", {}), ex.get("moved", {})
    objectives = list(imp) or list(next(iter(table.values()), {}))
    said = {True: "yes", False: "no", None: "-"}
    importance_rows = [[str(k)] + [c for o in objectives for c in (
        f"{imp[o][k]:.2f}" if isinstance(imp.get(o), dict) and k in imp[o] else "-", said.get(per.get(o), "-"))]
        for k, per in table.items()]
    notes = [f"{o}: importances {v}" for o, v in imp.items() if not isinstance(v, dict)]
    text = render_page("search.html", out=str(res.out), message=res.message, baseline=str(res.baseline),
                       reuse=str(res.reuse), seconds=res.seconds, test=str(res.test) if res.test else "",
                       compare=str(res.compare) if res.compare else "", plots=[p for p in plots if p], keys=keys,
                       rows=[[str(r.get(k)) for k in keys] for r in res.rows],
                       front=[[str(r.get(k)) for k in keys] for r in res.front], objectives=objectives,
                       importance_rows=importance_rows, importance_notes=notes, wasted=ex.get("wasted", []))
    write_text(path, text)
    return path
