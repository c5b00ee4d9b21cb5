"""Latency stability: the same model measured twice in one process must agree within 10%.

Two separately built copies of one model (same weights) are timed exactly as ``compress run``
times a stage against its baseline (``compress.measure.latency.measure_latency``, default ``benchmark:``
settings), for each backend and batch size, in several rounds. Also shown: the same with the wall
clock, to show why the default clock on one thread is the thread's CPU time. ``--sequential`` times
A and then A' (as two report rows are timed, minutes apart): absolute medians on a loaded machine
drift, which is why the report gives ratios from interleaved runs.

    .venv/bin/python -m benchmarks.latency_stability [--rounds 3] [--clocks auto,wall] [--sequential]
"""
from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from benchmarks.common import ROOT, machine_line, markdown_table
from compress.data import create_data
from compress.measure.config import BenchmarkConfig
from compress.measure.latency import measure_latency
from compress.measure.subject import Subject
from compress.models import create_model

MODELS = {
    "mlp 256x256 (quickstart)": {"name": "mlp", "hidden": [256, 256]},
    "lenet5": {"name": "lenet5"},
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clocks", default="auto,wall", help="comma-separated: auto, cpu, wall")
    ap.add_argument("--runs", type=int, help="override the default benchmark.runs")
    ap.add_argument("--min-sample-ms", type=float, help="override the default benchmark.min_sample_ms")
    ap.add_argument("--sequential", action="store_true",
                    help="time A, then A' (not interleaved), as two report rows are timed")
    args = ap.parse_args()
    over = {k: v for k, v in (("runs", args.runs), ("min_sample_ms", args.min_sample_ms)) if v is not None}
    data = create_data("digits")
    rows, raw, worst = [], [], {}
    t0 = time.time()
    for clock in args.clocks.split(","):
        cfg = BenchmarkConfig(clock=clock, progress=False, **over)
        for label, spec in MODELS.items():
            torch.manual_seed(0)
            a = create_model(spec, data.input_shape, data.num_outputs).eval()
            b = copy.deepcopy(a)
            for r in range(args.rounds):
                if args.sequential:  # as two report rows are timed: one after the other, not interleaved
                    lat = measure_latency(Subject(a), data, cfg)
                    other = measure_latency(Subject(b), data, cfg)
                    for backend in cfg.backends:
                        for bs, cell in lat.get(backend, {}).items():
                            cell["baseline_median_ms"] = other[backend][bs]["median_ms"]
                else:
                    lat = measure_latency(Subject(a), data, cfg, baseline=Subject(b))
                for backend in cfg.backends:
                    for bs, cell in lat.get(backend, {}).items():
                        m1, m2 = cell["median_ms"], cell["baseline_median_ms"]
                        diff = abs(m1 - m2) / min(m1, m2) * 100
                        key = (cell["clock"] + (" sequential" if args.sequential else ""), backend)
                        worst[key] = max(worst.get(key, 0.0), diff)
                        rows.append([key[0], label, backend, bs, r + 1, f"{m1:.4f}", f"{m2:.4f}", f"{diff:.1f}%",
                                     f"{cell['p90_ms']:.4f}", f"{cell['p99_ms']:.4f}"])
                        raw.append({"clock": cell["clock"], "model": label, "backend": backend, "batch": int(bs),
                                    "round": r + 1, "median_a_ms": m1, "median_b_ms": m2, "diff_pct": diff,
                                    "p90_ms": cell["p90_ms"], "p99_ms": cell["p99_ms"]})
    print(markdown_table(["clock", "model", "backend", "batch", "round", "median A (ms)", "median A' (ms)",
                          "|A - A'|", "p90 A", "p99 A"], rows))
    print()
    print(markdown_table(["clock", "backend", "worst |A - A'| over all rounds, models, batches", "bar (< 10%)"],
                         [[c, b, f"{w:.1f}%", "ok" if w < 10 else "FAILS"] for (c, b), w in sorted(worst.items())]))
    cfg = BenchmarkConfig(**over)
    print(f"\nsettings: {cfg.runs} interleaved samples per model, {cfg.warmup} warm-up samples, {cfg.threads} thread, "
          f"samples of >= {cfg.min_sample_ms} ms; {time.time() - t0:.0f} s")
    print(machine_line())
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"latency_stability{'_sequential' if args.sequential else ''}.json").write_text(json.dumps({"rows": raw, "machine": machine_line()}, indent=1))


if __name__ == "__main__":
    main()
