"""The whole chain against the fp32 teacher: recipes/mnist_deep_compression.yaml, end to end.

Bars (issue 9): the deployable artifact >= 40x smaller than the fp32 teacher, <= 0.5 points accuracy
drop, >= 3x faster in ONNX Runtime at batch 32 (interleaved with the teacher in one process).

    .venv/bin/python -m benchmarks.deep_compression [--seeds 0,1,2] [--set KEY=VALUE ...]
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from benchmarks.common import data_dir, machine_line, markdown_table
from compress.pipeline import Pipeline
from compress.report import stage_label

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "mnist_deep_compression.yaml"
OUT = Path("benchmarks/results/deep_compression")


def ort_speedup(row: dict, batch: str = "32") -> float | None:
    lat = (row.get("latency") or {}).get("onnxruntime", {}).get(batch)
    return lat.get("speedup") if lat else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    data_dir()
    torch.set_num_threads(1)  # training too: on a shared 2-core machine one thread is faster and steadier
    reports = []
    for seed in (int(s) for s in args.seeds.split(",")):
        out = OUT / f"seed{seed}"
        reports.append(Pipeline.from_yaml(RECIPE, [f"seed={seed}", *args.overrides]).run(out, force=True))
    (OUT / "reports.json").write_text(json.dumps(reports, indent=2))

    names = [stage_label(r) for r in reports[0]["stages"]]
    rows = []
    for i, name in enumerate(names):
        per = [rep["stages"][i] for rep in reports]
        base = [rep["stages"][0] for rep in reports]
        acc = [100 * r["metrics"]["accuracy"] for r in per]
        drop = [100 * (b["metrics"]["accuracy"] - r["metrics"]["accuracy"]) for b, r in zip(base, per)]
        smaller = [b["size_bytes"] / r["size_bytes"] for b, r in zip(base, per)]
        fast = [ort_speedup(r) for r in per]

        def ms(v, fmt):
            return fmt.format(statistics.mean(v)) + (f" ± {fmt.format(statistics.stdev(v))}" if len(v) > 1 else "")

        rows.append([name, ms(acc, "{:.2f}"), ms(drop, "{:+.2f}"), f"{statistics.mean(r['size_bytes'] for r in per) / 1024:.1f} KiB",
                     ms(smaller, "{:.1f}") + "x", f"{per[0]['params']:,}",
                     (ms(fast, "{:.2f}") + "x") if all(f is not None for f in fast) else "-"])
    print(markdown_table(["stage", "test accuracy %", "drop (points)", "artifact", "x smaller", "params (seed 0)", "ORT b32 x faster"], rows))
    last = [rep["stages"][-1] for rep in reports]
    first = [rep["stages"][0] for rep in reports]
    worst_drop = max(100 * (b["metrics"]["accuracy"] - r["metrics"]["accuracy"]) for b, r in zip(first, last))
    least_smaller = min(b["size_bytes"] / r["size_bytes"] for b, r in zip(first, last))
    least_fast = min(ort_speedup(r) or 0 for r in last)
    print(f"\nbars (worst seed): {least_smaller:.1f}x smaller (>= 40x: {'met' if least_smaller >= 40 else 'MISSED'}), "
          f"{worst_drop:+.2f} points (<= 0.5: {'met' if worst_drop <= 0.5 else 'MISSED'}), "
          f"{least_fast:.2f}x faster ORT b32 (>= 3x: {'met' if least_fast >= 3 else 'MISSED'})")
    print(f"seeds {args.seeds}; MNIST t10k seeded 8,000/2,000 split; " + machine_line())


if __name__ == "__main__":
    main()
