"""The one latency timer: ``Timer`` (k calls -> wall and CPU seconds), ``time_interleaved`` (many
timers sampled in alternating order) and ``stats_ms``. Every latency compress reports comes from here:
the benchmark rows (``compress.measure.latency``), the prune stage's latency budget, the benchmark scripts.
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable, Optional

import numpy as np


class Timer:
    """One thing to time: ``timed(k)`` runs it ``k`` times and returns (wall seconds, CPU seconds).

    CPU seconds are the calling thread's: with one intra-op thread both PyTorch and ONNX Runtime
    compute on the caller, so that clock leaves out the time the OS gives to other processes.
    A runtime whose work is not on the calling thread (a GPU) overrides ``timed``.
    """

    def __init__(self, fn: Callable[[], Any]):
        self.fn = fn

    def timed(self, k: int) -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.thread_time()
        for _ in range(k):
            self.fn()
        return time.perf_counter() - t0, time.thread_time() - c0


def stats_ms(samples: list[float]) -> dict:
    """Median, p90, p99 and mean of per-call seconds, in ms."""
    a = np.asarray(samples) * 1000
    return {"median_ms": round(float(np.median(a)), 5), "p90_ms": round(float(np.percentile(a, 90)), 5),
            "p99_ms": round(float(np.percentile(a, 99)), 5), "mean_ms": round(float(a.mean()), 5)}


def time_interleaved(timers: dict[str, Timer], runs: int, warmup: int, min_sample_ms: float = 0.0,
                     clock: str = "wall", bar=None, max_seconds: float = float("inf"),
                     reps: Optional[int] = None) -> dict[str, dict]:
    """Time every timer ``runs`` times, interleaved in alternating order; per-call statistics.

    A sample repeats a call ``k`` times (``k`` set so it lasts ``min_sample_ms``, or ``reps`` when given)
    because one sub-millisecond call is below the clock's and scheduler's noise. ``warmup`` untimed
    samples per timer come first. ``clock`` is "wall" or "cpu". Runs shrink (not below 10) to fit
    ``max_seconds``. ``bar``: a tqdm bar advanced once per run.
    """
    names = list(timers)
    calls, est = {}, 0.0
    for n in names:
        if reps is not None and not math.isfinite(max_seconds):
            calls[n] = reps  # nothing to plan: no calibration calls
            continue
        one = min(timers[n].timed(1)[0] for _ in range(3))
        calls[n] = reps or max(1, math.ceil(min_sample_ms / 1000 / max(one, 1e-7)))
        est += one * calls[n]
    planned = runs
    if math.isfinite(max_seconds):
        runs = max(min(runs, 10), min(runs, int(max_seconds / max(est, 1e-9)) - warmup))
    if bar is not None and planned > runs:
        bar.update(planned - runs)
    for _ in range(warmup):
        for n in names:
            timers[n].timed(calls[n])
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for i in range(runs):
        shift = i % len(names)
        for n in names[shift:] + names[:shift]:
            w, c = timers[n].timed(calls[n])
            wall[n].append(w / calls[n])
            cpu[n].append(c / calls[n])
        if bar is not None:
            bar.update(1)
    out = {}
    for n in names:
        main, other = (cpu[n], wall[n]) if clock == "cpu" else (wall[n], cpu[n])
        out[n] = {**stats_ms(main), "clock": clock, f"{'wall' if clock == 'cpu' else 'cpu'}_median_ms":
                  stats_ms(other)["median_ms"], "runs": runs, "calls_per_sample": calls[n]}
    return out
