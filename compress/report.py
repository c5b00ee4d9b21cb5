"""Report tables from ``report.json`` data."""
from __future__ import annotations


def _fmt_metrics(m: dict) -> str:
    if "accuracy" in m:
        return f"{100 * m['accuracy']:.2f}%"
    if "rmse" in m:
        return f"{m['rmse']:.4f}"
    return "-"


def format_table(report: dict) -> str:
    """A Markdown table: each stage against the first one (the baseline)."""
    rows = report["stages"]
    if not rows:
        return "(no stages)"
    metric = "accuracy" if "accuracy" in rows[0]["metrics"] else "rmse"
    base = rows[0]
    lines = [f"| stage | {metric} | size | x smaller | params | non-zero |", "|---|---|---|---|---|---|"]
    for r in rows:
        ratio = base["size_bytes"] / max(r["size_bytes"], 1)
        lines.append(f"| {r['index']}: {r['name']} | {_fmt_metrics(r['metrics'])} | {r['size_bytes'] / 1024:.1f} KiB "
                     f"| {ratio:.2f}x | {r['params']:,} | {r['nonzero_params']:,} |")
    return "\n".join(lines)
