"""Report tables and an HTML page from ``report.json`` data alone (nothing is rerun)."""
from __future__ import annotations

import base64
import datetime
import functools
import hashlib
import io
import json
from pathlib import Path
from typing import Annotated, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from compress.errors import CompressError, RecipeErrors


# -- formatting --------------------------------------------------------------------------------------

def fmt_bytes(n: Optional[float]) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def fmt_count(n: Optional[float]) -> str:
    if n is None:
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{int(n)}"


def metric_name(rows: list[dict]) -> str:
    for r in rows:
        m = r.get("metrics") or {}
        if "perplexity" in m:  # language models: accuracy is then next-token accuracy, shown beside it
            return "perplexity"
        if "accuracy" in m:
            return "accuracy"
        if "rmse" in m:
            return "rmse"
    return "accuracy"


def _fmt_metrics(m: dict) -> str:
    if "perplexity" in m:
        acc = f" ({100 * m['accuracy']:.1f}%)" if "accuracy" in m else ""
        return f"{m['perplexity']:.2f}{acc}"
    if "accuracy" in m:
        top5 = f" ({100 * m['top5']:.1f}%)" if "top5" in m else ""
        return f"{100 * m['accuracy']:.2f}%{top5}"
    if "rmse" in m:
        return f"{m['rmse']:.4f}"
    return "-"


METRIC_HEADERS = {"accuracy": "top-1 (top-5)", "perplexity": "perplexity (next-token acc.)", "rmse": "RMSE"}


def latency_keys(rows: list[dict]) -> list[tuple[str, str]]:
    """(backend, batch) pairs present in any row, in a stable order."""
    keys: list[tuple[str, str]] = []
    for r in rows:
        for backend, per in (r.get("latency") or {}).items():
            if isinstance(per, dict):
                for bs in per:
                    if (backend, bs) not in keys:
                        keys.append((backend, bs))
    order = {"pytorch": 0, "onnxruntime": 1, "cuda": 2}
    return sorted(keys, key=lambda k: (order.get(k[0], 9), int(k[1]) if k[1].isdecimal() else 0))


SHORT = {"pytorch": "PyTorch", "onnxruntime": "ORT", "cuda": "CUDA"}
LONG = {"pytorch": "PyTorch", "onnxruntime": "ONNX Runtime", "cuda": "CUDA"}
# Column headers name the row each ratio is taken against: one baseline per cell.
SMALLER = "x smaller vs first"
SLOW_COLUMN = "x speed vs its input"
Plot = tuple[str, str]  # (alt text: what it shows, base64 PNG drawn here)


def _latency_cell(r: dict, key: tuple[str, str]) -> str:
    """Median ms and x faster than the first row (the column's baseline)."""
    cell = ((r.get("latency") or {}).get(key[0]) or {}).get(key[1])
    if not cell:
        return "-"
    ms = cell["median_ms"]
    text = f"{ms:.3f} ms" if ms < 10 else f"{ms:.1f} ms"
    return f"{text} ({cell['speedup']:.2f}x)" if cell.get("speedup") is not None else text


def _slow_cell(slow: dict, i: int) -> str:
    """Speed against the stage's own input, for the latencies where it made its model slower."""
    out = [f"{SHORT.get(k[0], k[0])} b{k[1]} {ratio:.2f}x" for (j, k), ratio in slow.items() if j == i]
    return f"SLOWER: {', '.join(out)}" if out else "-"


SLOWER = 0.9  # a stage running below this share of its input's speed is flagged (10%: above timing noise)


def _speedup(r: dict, key: tuple[str, str]) -> Optional[float]:
    return ((((r.get("latency") or {}).get(key[0]) or {}).get(key[1])) or {}).get("speedup")


def slower_than_input(rows: list[dict]) -> dict[tuple[int, tuple[str, str]], float]:
    """(row position, latency key) -> speed relative to the stage's input, for stages that made it slower.

    The input is the previous row that describes the student (teacher rows are skipped). Both speedups are
    interleaved with the same first-stage model, so their ratio compares the two rows fairly.
    """
    out = {}
    prev = None
    for i, r in enumerate(rows):
        if r.get("role"):
            continue
        if prev is not None:
            for key in latency_keys([r]):
                a, b = _speedup(r, key), _speedup(prev, key)
                if a and b and a / b < SLOWER:
                    out[(i, key)] = a / b
        prev = r
    return out


def _int8_cell(r: dict) -> str:
    c = r.get("int8_check")
    if not c:
        return "-"
    top1 = f"top-1 {100 * c['top1_agreement']:.1f}%, " if c.get("top1_agreement") is not None else ""
    return f"{top1}max {100 * c['rel_diff']:.1f}%"


def run_label(rep: dict) -> str:
    """A run's name in comparisons: its folder name (two runs of one recipe differ there)."""
    return Path(rep["run_dir"]).name if rep.get("run_dir") else str(rep.get("recipe", "?"))


def _runs(report_or_reports) -> list[dict]:
    return report_or_reports if isinstance(report_or_reports, list) else [report_or_reports]


GEN_PREFILL, GEN_DECODE = "prefill ms (b1)", "decode tok/s (b1)"


def _generation_cells(row: dict) -> list[str]:
    from compress.measure.generation import generation_columns

    speeds = row.get("generation") or []
    cols = generation_columns(speeds, batch=1, threads=speeds[0]["threads"] if speeds else 1)
    prefill = next((v for k, v in cols.items() if k.startswith("prefill")), "-")
    return [prefill, cols.get("decode tok/s", "-")]


def table_rows(report_or_reports) -> tuple[list[str], list[list[str]]]:
    """Header and cells shared by the Markdown and HTML tables. Ratios are to each run's first row, except the
    last column's (to each stage's input); each header says which."""
    reports = _runs(report_or_reports)
    many = len(reports) > 1
    all_rows = [r for rep in reports for r in rep.get("stages", [])]
    metric = metric_name(all_rows)
    lkeys = latency_keys(all_rows)
    header = (["run"] if many else []) + [
        "stage", METRIC_HEADERS.get(metric, "RMSE"), "size", "zipped", SMALLER,
        "params", "non-zero", "bits/w", "MACs"]
    packed = any(r.get("packed_bytes") for r in all_rows)
    if packed:  # a packed (.cpk) row: its raw checkpoint beside it, and bits per non-zero weight
        header[header.index("zipped") + 1:header.index("zipped") + 1] = ["raw file"]
        header[header.index("bits/w") + 1:header.index("bits/w") + 1] = ["bits/nz"]
    header += [f"{SHORT.get(b, b)} b{bs} (x faster vs first)" for b, bs in lkeys]
    gen = any(r.get("generation") for r in all_rows)
    if gen:  # causal LMs: generation speed with the key-value cache (compress.measure.generation), 1 thread
        header += [GEN_PREFILL, GEN_DECODE]
    slows = [slower_than_input(rep.get("stages", [])) for rep in reports]
    if any(slows):
        header.append(SLOW_COLUMN)
    int8 = any(r.get("int8_check") for r in all_rows)
    if int8:
        header.append("int8 vs float")
    cells = []
    for rep, slow in zip(reports, slows):
        rows = rep.get("stages", [])
        if not rows:
            continue
        base = rows[0]
        for i, r in enumerate(rows):
            size = r.get("size_bytes")
            ratio = f"{base['size_bytes'] / max(size, 1):.2f}x" if size and base.get("size_bytes") else "-"
            bpw = r.get("weight_bits_per_weight")  # rows before it had only a file's bits/param: not shown
            line = ([run_label(rep)] if many else []) + [
                stage_label(r), _fmt_metrics(r.get("metrics") or {}),
                fmt_bytes(size), fmt_bytes(r.get("zipped_bytes")), ratio,
                f"{r['params']:,}" if r.get("params") is not None else "-",
                f"{r['nonzero_params']:,}" if r.get("nonzero_params") is not None else "-",
                f"{bpw:.1f}" if bpw is not None else "-", fmt_count(r.get("macs"))]
            if packed:
                line.insert(header.index("raw file"), fmt_bytes(r.get("raw_bytes")))
                line.insert(header.index("bits/nz"), _bits_nz(r))
            line += [_latency_cell(r, k) for k in lkeys]
            if gen:
                line += _generation_cells(r)
            if SLOW_COLUMN in header:
                line.append(_slow_cell(slow, i))
            if int8:
                line.append(_int8_cell(r))
            cells.append(line)
    return header, cells


def _bits_nz(r: dict) -> str:
    """Bits per non-zero weight: the packed file's own count, else the weights' bits over the non-zeros."""
    if r.get("weight_bits_per_nonzero") is not None:
        return f"{r['weight_bits_per_nonzero']:.1f}"
    if r.get("weight_bits_per_weight") is not None and r.get("params") and r.get("nonzero_params"):
        return f"{r['weight_bits_per_weight'] * r['params'] / r['nonzero_params']:.1f}"
    return "-"


def _ratio(x: float) -> str:
    return f"{x:.1f}x" if x < 100 else f"{x:.0f}x"


def waterfall_labels(sizes: list[Optional[int]], base: Optional[int] = None, prefix: str = "") -> list[Optional[str]]:
    """Bar labels of one series of the waterfall: each size, its ratio to ``base`` (default: the first size,
    labelled the baseline) and the step from the series' previous bar (left out where it says nothing new:
    the bar after the baseline, or no change). ``None`` sizes (no bar) get ``None``."""
    out: list[Optional[str]] = []
    prev, first = None, base is None
    for size in sizes:
        if size is None:
            out.append(None)
            continue
        if base is None:
            base = size
            out.append(f"{prefix}{fmt_bytes(size)} (baseline)")
        else:
            step = prev / size if prev else 1.0
            useful = prev is not None and not (first and prev == base) and abs(step - 1) > 0.005
            out.append(f"{prefix}{fmt_bytes(size)}: {_ratio(base / size)} smaller"
                       + ((f", {step:.1f}x from the stage above" if step > 1 else f", {1 / step:.1f}x larger than the stage above")
                          if useful else ""))
        prev = size
    return out


def _packed_sizes(rows: list[dict]) -> list[Optional[int]]:
    """Per row, the packed size of its model: measured by the encode stage for the stages before it
    (``packed_bytes_of_stages``); None for the packed row itself (its file is the packed one) and unknowns."""
    known: dict[str, int] = {}
    for r in rows:
        known.update(r.get("packed_bytes_of_stages") or {})
    return [None if r.get("packed_bytes") else known.get(str(r.get("index"))) for r in rows]


def _waterfall_plot(reports: list[dict]) -> Optional[Plot]:
    """Per-stage file size of each run that packed its model: a bar per stage, top to bottom, on a log axis
    whose ticks are file sizes: the stage's file (blue; green where it is the packed .cpk) and, where the
    encode stage measured it, what that stage's model takes packed (light green: pruning and clustering do
    not shrink a .pt, they shrink the packed file). Each bar says its size, its ratio to the first file and
    the step from the bar above; the axis starts well below the smallest file so every bar stays visible."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    runs = [rep for rep in reports if len(rep.get("stages", [])) > 1 and any(r.get("packed_bytes") for r in rep["stages"])]
    if not runs:
        return None
    heights = [len([r for r in rep["stages"] if r.get("size_bytes")]) for rep in runs]
    fig = Figure(figsize=(8.5, 1.0 * len(runs) + 0.55 * sum(heights)), layout="constrained")
    axes = fig.subplots(len(runs), 1, squeeze=False, height_ratios=heights)[:, 0]
    for ax, rep in zip(axes, runs):
        rows = [r for r in rep["stages"] if r.get("size_bytes")]
        sizes = [r["size_bytes"] for r in rows]
        packed = _packed_sizes(rows)
        two = any(p is not None for p in packed)
        h = 0.38 if two else 0.8
        fy = [i - (h / 2 if two else 0) for i in range(len(rows))]
        ax.barh(fy, sizes, height=h, color=["tab:green" if r.get("packed_bytes") else "tab:blue" for r in rows])
        labels = [(y, sz, t) for y, sz, t in zip(fy, sizes, waterfall_labels(sizes))]
        if two:
            py = [i + h / 2 for i in range(len(rows))]
            ax.barh([y for y, p in zip(py, packed) if p], [p for p in packed if p], height=h, color="#9ed39e")
            labels += [(y, p, t) for y, p, t in zip(py, packed, waterfall_labels(packed, sizes[0], "packed: ")) if p]
        for y, size, text in labels:
            ax.annotate(text, (size, y), textcoords="offset points", xytext=(4, 0), va="center", fontsize=7.5)
        ax.set_yticks(range(len(rows)), [stage_label(r) for r in rows], fontsize=8)
        ax.invert_yaxis()  # first stage on top: the sizes fall down the page
        ax.set_xscale("log")
        small = min([*sizes, *(p for p in packed if p)])
        ax.set_xlim(small / 4, max(sizes) * 60)  # room on the right for the labels
        # ticks at round file sizes (1 KiB, 10 KiB, 100 KiB, 1 MiB, ...), not at powers of ten bytes
        ax.xaxis.set_major_locator(FixedLocator([u * 10 ** j for u in (1 << 10, 1 << 20, 1 << 30) for j in range(3)]))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: fmt_bytes(v).replace(".0 ", " ")))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.tick_params(axis="x", labelsize=8)
        ax.set_xlabel("file size (log scale)", fontsize=8)
        ax.set_title(f"size waterfall{': ' + run_label(rep) if len(runs) > 1 else ''}", fontsize=10)
        handles = [Patch(color="tab:blue", label="saved file (.pt / .onnx)"), Patch(color="tab:green", label="packed .cpk")]
        if two:
            handles.append(Patch(color="#9ed39e", label="that stage's model, packed"))
        ax.legend(handles=handles, fontsize=7, loc="lower right")
    return "size waterfall: file size per stage", _png(fig)


def format_table(report) -> str:
    """What the chain bought overall, then a Markdown table: each stage against the first one (the baseline).
    Accepts a list of reports."""
    header, cells = table_rows(report)
    if not cells:
        return "(no stages)"
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c) + " |" for c in cells]
    summary = "\n".join(summary_lines(_runs(report)))
    notes = "\n\n".join(text for text, _ in _notes(_runs(report)))
    return (f"{summary}\n\n" if summary else "") + "\n".join(lines) + (f"\n\n{notes}" if notes else "")


def _notes(reports: list[dict]) -> list[tuple[str, bool]]:
    """(sentence, whether it flags a slowdown) for the notes under the table."""
    notes = [(_latency_note(reports), False), (_slow_note(reports), True), (_skipped_note(reports), False),
             (_int8_note(reports), False)]
    return [(text, slow) for text, slow in notes if text]


def summary_lines(reports: list[dict]) -> list[str]:
    """One line per run: what the whole chain bought, its last row against its first, in file size, speed
    (the runtime and batch the accuracy-vs-latency plot uses) and quality."""
    out = []
    for rep in reports:
        rows = rep.get("stages", [])
        if len(rows) < 2:
            continue
        first, last = rows[0], rows[-1]
        parts = []
        if first.get("size_bytes") and last.get("size_bytes"):
            x = first["size_bytes"] / last["size_bytes"]
            parts.append(f"{_ratio(x)} smaller" if x >= 1 else f"{_ratio(1 / x)} larger")
        key = _latency_key(rows)
        speedup = _speedup(last, key) if key else None
        if speedup:  # the last row was timed interleaved with the first row's model: the ratio is to it
            pace = f"{speedup:.2f}x faster" if speedup >= 1 else f"{1 / speedup:.2f}x slower"
            parts.append(f"{pace} in {LONG.get(key[0], key[0])} at batch {key[1]}")
        metric = metric_name(rows)
        before, after = _quality(first, metric), _quality(last, metric)
        if before is not None and after is not None:
            parts.append(f"{after - before:+.2f} points top-1" if metric == "accuracy"
                         else f"perplexity {before:.2f} -> {after:.2f}" if metric == "perplexity"
                         else f"{after - before:+.4f} RMSE")
        if parts:
            run = f" ({run_label(rep)})" if len(reports) > 1 else ""
            out.append(f"Overall{run}: {', '.join(parts)} ({stage_label(last)} against {stage_label(first)}).")
    return out


def _skipped_note(reports: list[dict]) -> str:
    """Why a backend has no latency column (``latency.notes``: not available here, or it failed)."""
    notes = []
    for rep in reports:
        for r in rep.get("stages", []):
            for n in (r.get("latency") or {}).get("notes") or []:
                if n not in notes:
                    notes.append(n)
    return ("Latency not measured: " + "; ".join(notes) + ".") if notes else ""


def _slow_note(reports: list[dict]) -> str:
    """One sentence per stage that made its model slower than the model it was given."""
    out = []
    for rep in reports:
        rows = rep.get("stages", [])
        for (i, key), ratio in slower_than_input(rows).items():
            out.append(f"{stage_label(rows[i])} runs at {ratio:.2f}x the speed of its input in {LONG.get(key[0], key[0])} "
                       f"at batch {key[1]} (SLOWER)")
    return ("Stages slower than their input: " + "; ".join(out) + ".") if out else ""


def _int8_note(reports: list[dict]) -> str:
    for rep in reports:
        for r in rep.get("stages", []):
            c = r.get("int8_check")
            if c:
                return (f"int8 vs float: the int8 file in ONNX Runtime's kernels against its float reference on "
                        f"{c.get('samples', '?')} {c.get('split', '?')} samples (share of predicted classes that agree; largest difference "
                        f"as a share of the largest output), on {c.get('cpu', '?')}; format: {c.get('format', '?')}.")
    return ""


def _latency_note(reports: list[dict]) -> str:
    for rep in reports:
        for r in rep.get("stages", []):
            lat = r.get("latency")
            if lat:
                cells = [c for per in lat.values() if isinstance(per, dict) for c in per.values() if isinstance(c, dict)]
                clock = {"cpu": "the thread's CPU time", "wall": "wall clock"}.get(cells[0].get("clock"), "") if cells else ""
                return (f"Latency: median ms per call{f' ({clock})' if clock else ''}, {lat.get('threads')} thread(s), {lat.get('runs')} samples "
                        "per model; x faster = first stage's median / this stage's median, both timed interleaved "
                        "in the same process (absolute ms of different rows were timed at different moments).")
    return ""


# -- plots -------------------------------------------------------------------------------------------

def pareto_front(points: list[tuple[float, float]], maximize: bool = True) -> list[tuple[float, float]]:
    """Points no other point beats on both cost (lower is better) and quality; sorted by cost."""
    best, front = None, []
    for cost, q in sorted(points, key=lambda p: (p[0], -p[1] if maximize else p[1])):
        if best is None or (q > best if maximize else q < best):
            front.append((cost, q))
            best = q
    return front


def _quality(r: dict, metric: str) -> Optional[float]:
    m = r.get("metrics") or {}
    if metric not in m:
        return None
    return 100 * m[metric] if metric == "accuracy" else m[metric]


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def stage_label(row: dict) -> str:
    """'0: train (teacher)': the row's place in the run, its stage, and its role when it is not the student."""
    role = f" ({row['role']})" if row.get("role") else ""
    return f"{row.get('index', '?')}: {row.get('name', '?')}{role}"


def _labelled(reports: list[dict]):
    many = len(reports) > 1
    for rep in reports:
        for r in rep.get("stages", []):
            label = stage_label(r)
            yield (f"{run_label(rep)}/{label}" if many else label), r


def _tradeoff_plot(reports: list[dict], metric: str, cost_of, xlabel: str, title: str, logx: bool = True) -> Optional[Plot]:
    from matplotlib.figure import Figure

    maximize = metric == "accuracy"
    fig = Figure(figsize=(7, 4.5), layout="tight")
    ax = fig.add_subplot()
    points = []
    for i, rep in enumerate(reports):
        xs, ys, labels = [], [], []
        for label, r in _labelled([rep]):
            c, q = cost_of(r), _quality(r, metric)
            if c is None or q is None:
                continue
            xs.append(c), ys.append(q), labels.append(label)
        if not xs:
            continue
        ax.scatter(xs, ys, s=40, zorder=3, label=run_label(rep) if len(reports) > 1 else None)
        # One label per cluster of near points: stages that did not change the model land on top of each other.
        near: list[tuple[float, float, list[str]]] = []
        xspan, yspan = max(map(abs, xs)) or 1.0, (max(ys) - min(ys)) or 1.0
        for x, y, lab in zip(xs, ys, labels):
            for cx, cy, labs in near:
                if abs(x - cx) < 0.04 * xspan and abs(y - cy) < 0.04 * yspan:
                    labs.append(lab)
                    break
            else:
                near.append((x, y, [lab]))
        for j, (x, y, labs) in enumerate(near):  # alternate above/below so close clusters stay legible
            ax.annotate(", ".join(labs), (x, y), textcoords="offset points", xytext=(6, 5 if j % 2 == 0 else -12), fontsize=8)
        points += list(zip(xs, ys))
    if not points:
        return None
    front = pareto_front(points, maximize)
    ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="tab:red", lw=1.5, zorder=2)
    ax.scatter([p[0] for p in front], [p[1] for p in front], s=140, facecolors="none", edgecolors="tab:red", lw=1.5,
               zorder=4, label="Pareto front")
    lo, hi = min(p[0] for p in points), max(p[0] for p in points)
    if logx and lo > 0 and hi / lo > 5:
        from matplotlib.ticker import FuncFormatter

        ax.set_xscale("log")
        from matplotlib.ticker import NullFormatter

        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels on a log axis overlap
        xlabel += ", log scale"
    else:
        ax.set_xlim(0, hi * 1.25 if hi > 0 else 1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("top-1 accuracy (%)" if maximize else "perplexity (lower is better)" if metric == "perplexity"
                  else "RMSE (lower is better)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return title, _png(fig)


def _latency_key(rows: list[dict]) -> Optional[tuple[str, str]]:
    keys = latency_keys(rows)
    for k in keys:  # batch 1 reads as 'latency'; prefer the deployable runtime
        if k == ("onnxruntime", "1"):
            return k
    return keys[0] if keys else None


def _relative_latency(r: dict, key: tuple[str, str]) -> Optional[float]:
    cell = ((r.get("latency") or {}).get(key[0]) or {}).get(key[1]) or {}
    return 1 / cell["speedup"] if cell.get("speedup") else None


MAX_LAYERS = 64  # bars per series in the per-layer plot: more are unreadable (and a huge figure)


def _layer_label(layer: dict, i: int) -> str:
    """'1 (Linear 64x64)': the module path, with type and weight shape where recorded (a Sequential's paths are
    bare indices)."""
    name = str(layer.get("name", i))
    if not layer.get("type"):
        return name
    shape = "x".join(str(n) for n in layer.get("shape") or [])
    return f"{name} ({layer['type']}{' ' + shape if shape else ''})"


def _layers_plot(reports: list[dict]) -> Optional[Plot]:
    """Per-layer sparsity (or bit width) of every row that has non-trivial values. Layers at 0% sparsity in
    every row shown (the classifier pruning leaves alone, say) are named in the title, not drawn as empty slots."""
    from matplotlib.figure import Figure

    series = []
    for label, r in _labelled(reports):
        layers = r.get("layers")
        if isinstance(layers, dict):
            layers = [{"name": k, **(v if isinstance(v, dict) else {"value": v})} for k, v in layers.items()]
        if not layers:
            continue
        for key in ("bits", "sparsity", "value"):
            vals = [(_layer_label(layer, i), layer.get(key)) for i, layer in enumerate(layers)]
            if all(v is not None for _, v in vals) and any(v for _, v in vals):
                series.append((label, key, vals))
                break
    if not series:
        return None
    kind = series[0][1]
    series = [s for s in series if s[1] == kind][:8]
    names = []
    for _, _, vals in series:
        names += [n for n, _ in vals if n not in names]
    title = f"Per-layer {kind}"
    if kind == "sparsity":
        untouched = [n for n in names if not any(dict(vals).get(n) for _, _, vals in series)]
        names = [n for n in names if n not in untouched]
        if untouched:
            more = f" and {len(untouched) - 3} more" if len(untouched) > 3 else ""
            title += f"\nnot shown, 0% in every row: {', '.join(untouched[:3])}{more}"
    if len(names) > MAX_LAYERS:
        title += f"\nfirst {MAX_LAYERS} of {len(names)} layers"
        names = names[:MAX_LAYERS]
    fig = Figure(figsize=(max(7, 0.5 * len(names) + 3), 4.5), layout="tight")
    ax = fig.add_subplot()
    width = 0.8 / len(series)
    for j, (label, _, vals) in enumerate(series):
        d = dict(vals)
        ax.bar([i + j * width for i in range(len(names))],
               [100 * d.get(n, 0) if kind == "sparsity" else d.get(n, 0) for n in names], width, label=label)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))])
    ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel({"sparsity": "zeros (%)", "bits": "bits per weight"}.get(kind, kind))
    ax.set_title(title, fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return f"{title.replace(chr(10), '; ')}; layers: {', '.join(names)}", _png(fig)


def _speed_plot(reports: list[dict]) -> Optional[Plot]:
    """x faster than the first stage, per backend and batch size."""
    from matplotlib.figure import Figure

    rows = list(_labelled(reports))
    keys = latency_keys([r for _, r in rows])
    if not keys or len(rows) < 2:
        return None
    fig = Figure(figsize=(min(60, max(7, 0.9 * len(rows) + 3)), 4), layout="tight")  # many compared runs: capped
    ax = fig.add_subplot()
    width = 0.8 / len(keys)
    for j, k in enumerate(keys):
        vals = [(((r.get("latency") or {}).get(k[0]) or {}).get(k[1]) or {}).get("speedup") or 0 for _, r in rows]
        ax.bar([i + j * width for i in range(len(rows))], vals, width, label=f"{SHORT.get(k[0], k[0])} batch {k[1]}")
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))])
    ax.set_xticklabels([lab for lab, _ in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("x faster than the first stage")
    ax.set_title("Latency ratio (interleaved with the baseline)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return "x faster than the first stage, per backend and batch size", _png(fig)


DETAIL = ("stage", "backend", "batch", "median ms", "p90 ms", "p99 ms", "x faster vs first", "samples", "clock")


def _latency_detail(reports: list[dict]) -> list[list[str]]:
    """Rows with every latency statistic (the Markdown table shows medians only)."""
    def ms(v):
        return f"{v:.4f}" if v is not None else "-"

    out = []
    for label, r in _labelled(reports):
        for backend, per in (r.get("latency") or {}).items():
            if not isinstance(per, dict):
                continue
            for bs, c in per.items():
                if isinstance(c, dict) and "median_ms" in c:
                    out.append([label, SHORT.get(backend, backend), bs, ms(c["median_ms"]), ms(c.get("p90_ms")),
                                ms(c.get("p99_ms")), f"{c['speedup']:.2f}x" if c.get("speedup") is not None else "-",
                                str(c.get("runs", "-")), str(c.get("clock", "-"))])
    return out


@functools.lru_cache(maxsize=None)
def _templates():
    from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

    # autoescape: every value of a page comes from data (a report.json, a study) and is text, never markup.
    return Environment(loader=PackageLoader("compress", "templates"), undefined=StrictUndefined,
                       autoescape=select_autoescape(default=True, default_for_string=True))


def render_page(template: str, **context) -> str:
    """A page from ``compress/templates``, every value HTML-escaped."""
    return _templates().get_template(template).render(**context)


def text_labels():
    """Plot text from data is literal: a '$' in a stage or layer name would start mathtext, and a bad formula
    fails the whole page when the figure is drawn. Wrap figure building and saving in it."""
    import matplotlib

    return matplotlib.rc_context({"text.parse_math": False})


def _machine_line(m: dict) -> str:
    flags = ", ".join(m.get("int8_flags") or []) or "none"
    vnni = "" if m.get("vnni") is None else (" (VNNI)" if m.get("vnni") else " (no VNNI)")
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ""
    return (f"{m.get('cpu', '?')}, {m.get('cores')} cores{gpu}; int8 features: {flags}{vnni}; "
            f"torch {m.get('torch')}, onnxruntime {m.get('onnxruntime')}")


def render_html(report_or_reports) -> str:
    """One self-contained page: summary, table, machine, and plots as base64 PNG (data: URIs drawn here)."""
    reports = _runs(report_or_reports)
    rows = [r for rep in reports for r in rep.get("stages", [])]
    metric = metric_name(rows)
    header, cells = table_rows(reports)
    slow_at = header.index(SLOW_COLUMN) if SLOW_COLUMN in header else None
    lk = _latency_key(rows)
    with text_labels():
        plots = [
            _tradeoff_plot(reports, metric, lambda r: r.get("size_bytes") and r["size_bytes"] / 1024,
                           "size on disk (KiB)", f"{metric} vs size"),
            # Relative latency (1 / x faster) from interleaved runs: absolute ms of different rows drift with load.
            _tradeoff_plot(reports, metric, lambda r: _relative_latency(r, lk),
                           f"latency relative to the first stage ({SHORT.get(lk[0], lk[0])}, batch {lk[1]}; lower is faster)",
                           f"{metric} vs latency", logx=False) if lk else None,
            _speed_plot(reports),
            _layers_plot(reports),
            _waterfall_plot(reports),
        ]
    machines = {json.dumps(rep.get("machine"), sort_keys=True): rep.get("machine") for rep in reports if rep.get("machine")}
    return render_page(
        "report.html", title=" vs ".join(run_label(rep) for rep in reports), summary=summary_lines(reports),
        header=header, cells=[[(c, j == slow_at and c != "-") for j, c in enumerate(row)] for row in cells],
        notes=_notes(reports), plots=[p for p in plots if p], detail_header=DETAIL, detail=_latency_detail(reports),
        runs=[(str(rep.get("run_dir", "")), rep.get("seconds", "?")) for rep in reports],
        machines=[_machine_line(m) for m in machines.values()],
        generated=datetime.datetime.now().isoformat(timespec="seconds"))


def write_html(report_or_reports, path: str | Path, force: bool = False) -> Path:
    """Write the page, unless ``path`` already shows these same rows (plots take a second each)."""
    from compress.utils import write_text

    path = Path(path)
    key = hashlib.sha256(json.dumps([{k: v for k, v in rep.items() if k != "seconds"} for rep in _runs(report_or_reports)],
                                    sort_keys=True, default=str).encode()).hexdigest()[:16]
    stamp = f"<!-- compress report {key} -->"
    if not force and path.is_file() and stamp in path.read_text(errors="replace")[:200]:
        return path
    doctype, rest = render_html(report_or_reports).split("\n", 1)  # the stamp goes after the doctype (standards mode)
    write_text(path, f"{doctype}\n{stamp}\n{rest}")
    return path


# -- reading a report.json -----------------------------------------------------------------------------
# A report.json may come from anyone (a CI artifact, a colleague): the keys the page and table read are
# checked here, so a wrong type is one line naming the file and key, not a traceback in a plot.

MAX_REPORT_BYTES = 64 << 20
MAX_STAGES = 256  # per run: a real chain has a handful; each row is a bar in plots sized by the row count

Text = Annotated[str, Field(max_length=4096)]
Number = Annotated[float, Field(allow_inf_nan=False, ge=-1e15, le=1e15)]  # plots refuse inf; 1e15: no overflow
Amount = Annotated[float, Field(allow_inf_nan=False, ge=0, le=1e15)]
Ratio = Annotated[float, Field(allow_inf_nan=False, gt=0, le=1e15)]
Count = Annotated[int, Field(ge=0, le=2**62)]
Batch = Annotated[str, Field(pattern=r"^[0-9]{1,9}$")]


class _Read(BaseModel):
    """Keys the report reads, typed; other keys are dropped on reading (they are never shown)."""

    model_config = ConfigDict(extra="ignore")


class _Cell(_Read):
    median_ms: Amount
    p90_ms: Optional[Amount] = None
    p99_ms: Optional[Amount] = None
    speedup: Optional[Ratio] = None
    runs: Optional[Count] = None
    clock: Optional[Text] = None


class _Int8(_Read):
    rel_diff: Amount
    top1_agreement: Optional[Amount] = None
    samples: Optional[Count] = None
    split: Optional[Text] = None
    cpu: Optional[Text] = None
    format: Optional[Text] = None


class _Layer(_Read):
    name: Optional[Text] = None
    type: Optional[Text] = None
    shape: Optional[list[Count]] = Field(None, max_length=8)
    params: Optional[Count] = None
    sparsity: Optional[Number] = None
    bits: Optional[Number] = None
    value: Optional[Number] = None


class _Metrics(_Read):
    accuracy: Optional[Number] = None
    top5: Optional[Number] = None
    rmse: Optional[Number] = None


class _Row(_Read):
    name: Optional[Text] = None
    index: Optional[Count] = None
    role: Optional[Text] = None
    metrics: Optional[_Metrics] = None
    size_bytes: Optional[Count] = None
    zipped_bytes: Optional[Count] = None
    raw_bytes: Optional[Count] = None
    packed_bytes: Optional[Count] = None
    packed_bytes_of_stages: Optional[dict[Text, Count]] = None
    params: Optional[Count] = None
    nonzero_params: Optional[Count] = None
    macs: Optional[Count] = None
    weight_bits_per_weight: Optional[Amount] = None
    weight_bits_per_nonzero: Optional[Amount] = None
    # backend -> batch -> cell, beside "threads", "runs" and "notes"
    latency: Optional[dict[Text, Union[dict[Batch, _Cell], Count, list[Text], None]]] = None
    int8_check: Optional[_Int8] = None
    layers: Optional[Union[list[_Layer], dict[Text, Union[_Layer, Number]]]] = None


class _Machine(_Read):
    cpu: Optional[Text] = None
    cores: Optional[Count] = None
    gpu: Optional[Text] = None
    int8_flags: Optional[list[Text]] = None
    vnni: Optional[bool] = None
    torch: Optional[Text] = None
    onnxruntime: Optional[Text] = None


class _Report(_Read):
    recipe: Optional[Text] = None
    run_dir: Optional[Text] = None
    seconds: Optional[Amount] = None
    machine: Optional[_Machine] = None
    stages: list[_Row] = Field(max_length=MAX_STAGES)


def _one_line(f: Path, what: str) -> CompressError:
    what = what if len(what) <= 300 else what[:300] + "..."  # a hostile value may be megabytes long
    return CompressError(f"{f}: {what}")


def load_report(run_dir: str | Path) -> dict:
    """A run's saved report (``RUN_DIR/report.json``, or the JSON file itself), with the keys the report reads
    checked (and only those kept)."""
    from compress.config import validate

    p = Path(run_dir)
    f = p / "report.json" if p.is_dir() else p
    if not f.is_file():
        raise CompressError(f"{p}: no report.json (is it a run directory of 'compress run'?)")
    if f.stat().st_size > MAX_REPORT_BYTES:
        raise _one_line(f, f"{f.stat().st_size:,} bytes; a compress report is at most {MAX_REPORT_BYTES >> 20} MiB")
    try:
        rep = json.loads(f.read_bytes())
    except RecursionError:
        raise _one_line(f, "nested too deeply to be a compress report") from None
    except ValueError as exc:  # JSONDecodeError, or bytes that are not UTF-8
        raise _one_line(f, f"not valid JSON ({exc})") from None
    if not isinstance(rep, dict) or not isinstance(rep.get("stages"), list):
        raise _one_line(f, "not a compress report (expected a 'stages' list)")
    try:
        checked = validate(_Report, rep)
    except RecipeErrors as exc:
        more = f" (and {len(exc.errors) - 1} more)" if len(exc.errors) > 1 else ""
        raise _one_line(f, f"{exc.errors[0]}{more}") from None
    return checked.model_dump(exclude_none=True)
