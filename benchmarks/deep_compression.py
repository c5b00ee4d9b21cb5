"""Deep Compression chains end to end, every row against the recipe's first (fp32) row.

    .venv/bin/python -m benchmarks.deep_compression [--seeds 0,1,2] [--set KEY=VALUE ...]
    .venv/bin/python -m benchmarks.deep_compression --recipe recipes/mnist_lenet5_deep_compression.yaml
    .venv/bin/python -m benchmarks.deep_compression --kernelnet      # KernelNet student: bake -> cluster -> pack

Bars of recipes/mnist_deep_compression.yaml (issue 20): the packed file >= 100x smaller than the fp32
teacher on every seed at <= 0.5 points test-accuracy drop. For the paper's own networks the ratio is
printed beside Deep Compression's (Han et al. 2016: LeNet-300-100 40x, LeNet-5 39x). ``--kernelnet`` runs
recipes/movielens_kernelnet_kd.yaml on all of u1.base (as benchmarks/kernelnet_movielens.py's phase 2) with
bake_kernels -> cluster -> encode after the distilled student, and compares against that student.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from benchmarks.common import ROOT, data_dir, machine_line, markdown_table
from compress.pipeline import Pipeline
from compress.recipe import read_yaml
from compress.report import stage_label

RECIPE = ROOT / "recipes" / "mnist_deep_compression.yaml"
KERNELNET = ROOT / "recipes" / "movielens_kernelnet_kd.yaml"
OUT = ROOT / "benchmarks" / "results" / "deep_compression"
PAPER = {"mnist_lenet_300_100_deep_compression": 40, "mnist_lenet5_deep_compression": 39}  # Han et al. 2016, Tables 2-3
# The packed tail for the KernelNet student: KernelLinear baked to Linear (its cut connections become zeros a
# sparse index stores), 5-bit codebooks (the paper's choice for dense layers), centroids fine-tuned with the
# same KD term as the student's distillation.
KERNELNET_TAIL = [
    {"bake_kernels": {}},
    {"cluster": {"bits": 5, "init": "linear", "kd": {"beta": 1.0},
                 "finetune": {"epochs": 3, "optimizer": {"name": "adam", "lr": 0.0003}, "scheduler": {"name": "cosine"}}}},
    {"encode": {}},
]
KERNELNET_SET = ["data.val_fraction=0", "benchmark.latency=false", "benchmark.progress=false"]


def ort_speedup(row: dict, batch: str = "32") -> float | None:
    lat = (row.get("latency") or {}).get("onnxruntime", {}).get(batch)
    return lat.get("speedup") if lat else None


def kernelnet_doc() -> dict:
    doc = read_yaml(KERNELNET)
    doc["stages"] = [s for s in doc["stages"] if "evaluate" not in s] + KERNELNET_TAIL
    doc["name"] += "_packed"
    return doc


def metric_of(row: dict) -> tuple[str, float]:
    m = row["metrics"]
    return ("accuracy", 100 * m["accuracy"]) if "accuracy" in m else ("rmse", m["rmse"])


def mean_sd(v: list[float], fmt: str) -> str:
    return fmt.format(statistics.mean(v)) + (f" ± {fmt.replace('+', '').format(statistics.stdev(v))}" if len(v) > 1 else "")


def table(reports: list[dict], base: int) -> tuple[list[str], list[list]]:
    """One row per stage (mean ± sd over seeds): metric, its change against stage ``base``, size against
    stage 0 (the fp32 model) and, when ``base`` is another stage, against that one too."""
    kind = metric_of(reports[0]["stages"][0])[0]
    header = ["stage", "test accuracy %" if kind == "accuracy" else "test RMSE",
              f"drop vs row {base} (points)" if kind == "accuracy" else f"RMSE vs row {base}", "file", "x smaller than row 0"]
    header += [f"x smaller than row {base}"] if base else []
    header += ["bits/weight (file)", "ORT b32 x faster"]
    rows = []
    for i in range(len(reports[0]["stages"])):
        per = [rep["stages"][i] for rep in reports]
        val = [metric_of(r)[1] for r in per]
        ref = [metric_of(rep["stages"][base])[1] for rep in reports]
        change = [b - v for b, v in zip(ref, val)] if kind == "accuracy" else [100 * (v / b - 1) for b, v in zip(ref, val)]
        row = [stage_label(per[0]), mean_sd(val, "{:.2f}" if kind == "accuracy" else "{:.4f}"),
               mean_sd(change, "{:+.2f}" if kind == "accuracy" else "{:+.2f}%"),
               f"{statistics.mean(r['size_bytes'] for r in per) / 1024:.1f} KiB",
               mean_sd([rep["stages"][0]["size_bytes"] / r["size_bytes"] for rep, r in zip(reports, per)], "{:.1f}") + "x"]
        if base:
            row.append(mean_sd([rep["stages"][base]["size_bytes"] / r["size_bytes"] for rep, r in zip(reports, per)], "{:.1f}") + "x")
        bpw = [r.get("weight_bits_per_weight") for r in per]
        fast = [ort_speedup(r) for r in per]
        row += [mean_sd(bpw, "{:.2f}") if all(b is not None for b in bpw) else "-",
                (mean_sd(fast, "{:.2f}") + "x") if all(f is not None for f in fast) else "-"]
        rows.append(row)
    return header, rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", type=Path, default=RECIPE)
    ap.add_argument("--kernelnet", action="store_true", help="the KernelNet student, baked, clustered and packed")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", type=Path, default=None, help="run folders and reports.json (default: benchmarks/results/<name>)")
    ap.add_argument("--tables-only", action="store_true",
                    help="run nothing: the tables of the seeds' report.json already in --out (seeds run one at a time)")
    args = ap.parse_args(argv)
    data_dir()
    torch.set_num_threads(1)  # training too: on a shared 2-core machine one thread is faster and steadier
    doc = kernelnet_doc() if args.kernelnet else read_yaml(args.recipe)
    overrides = (KERNELNET_SET if args.kernelnet else []) + args.overrides
    out_dir = args.out or OUT.parent / doc["name"]
    reports = []
    for seed in (int(s) for s in args.seeds.split(",")):
        if args.tables_only:
            reports.append(json.loads((out_dir / f"seed{seed}" / "report.json").read_text()))
            continue
        reports.append(Pipeline.from_dict(doc, [f"seed={seed}", *overrides]).run(out_dir / f"seed{seed}", force=True))
        (out_dir / "reports.json").write_text(json.dumps(reports, indent=2))

    base = 1 if args.kernelnet else 0  # the KernelNet rows compare against the distilled student
    header, rows = table(reports, base)
    print(markdown_table(header, rows))
    # the bar is on the first packed file (in mnist_deep_compression: stage 4, the clustered float weights)
    bar = next((i for i, r in enumerate(reports[0]["stages"]) if r.get("packed_bytes")), -1)
    first, last = [rep["stages"][base] for rep in reports], [rep["stages"][bar] for rep in reports]
    smaller = [rep["stages"][0]["size_bytes"] / r["size_bytes"] for rep, r in zip(reports, last)]
    if args.kernelnet:
        rm = [100 * (metric_of(r)[1] / metric_of(b)[1] - 1) for b, r in zip(first, last)]
        print(f"\npacked student: {min(b['size_bytes'] / r['size_bytes'] for b, r in zip(first, last)):.1f}x smaller than the "
              f"student's .pt (worst seed), {min(smaller):.1f}x than the teacher's; test RMSE {max(rm):+.2f}% (worst seed)")
    else:
        drop = max(metric_of(b)[1] - metric_of(r)[1] for b, r in zip(first, last))
        paper = PAPER.get(doc["name"])
        goal = (f"(paper: {paper}x)" if paper else f"(>= 100x: {'met' if min(smaller) >= 100 else 'MISSED'})")
        print(f"\nworst seed, row {bar}: {min(smaller):.1f}x smaller than row 0 {goal}, {drop:+.2f} points "
              f"(<= 0.5: {'met' if drop <= 0.5 else 'MISSED'})")
    print(f"seeds {args.seeds}; {doc['name']}; measured on a shared machine; " + machine_line())


if __name__ == "__main__":
    main()
