"""Latency of a model in every backend of ``compress.runtime.backends``, as a ratio to a baseline
timed interleaved with it in the same process (``compress.runtime.timing``)."""
from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from compress.errors import CompressError
from compress.measure.config import BenchmarkConfig
from compress.measure.subject import Subject, batch_of
from compress.runtime.backends import BACKENDS, LatencyBackend, torch_threads
from compress.runtime.onnx import to_onnx
from compress.runtime.timing import time_interleaved


def _backends(cfg: BenchmarkConfig) -> dict[str, LatencyBackend]:
    """The listed backends, then the GPU ones nobody listed when ``cfg.gpu`` and a GPU is there."""
    out = {name: BACKENDS.get(name, "benchmark.backends").obj() for name in cfg.backends}
    if cfg.gpu:
        for entry in BACKENDS:
            if entry.name not in out and entry.obj.gpu and entry.obj().available():
                out[entry.name] = entry.obj()
    return out


def measure_latency(subject: Subject, data, cfg: BenchmarkConfig, baseline: Optional[Subject] = None,
                    desc: str = "latency") -> dict:
    """Latency of ``subject`` per backend and batch size, interleaved with ``baseline`` when given.

    Returns ``{"threads", "runs", <backend>: {<batch>: {median_ms, p90_ms, p99_ms, ..., speedup}}}``;
    speedup is baseline median / subject median from the same interleaved samples.
    """
    backends = _backends(cfg)
    out: dict[str, Any] = {"threads": cfg.threads, "runs": cfg.runs}
    pairs = [("subject", subject)] + ([("baseline", baseline)] if baseline is not None else [])
    with tempfile.TemporaryDirectory() as tmp, torch_threads(cfg.threads):
        onnx_files: dict[str, Path] = {}
        if any(b.runs == "onnx" for b in backends.values()):
            for role, s in pairs:
                if s.onnx is not None:
                    onnx_files[role] = s.onnx
                elif s.model is not None:
                    try:
                        onnx_files[role] = to_onnx(s.model.cpu(), batch_of(data, 1), Path(tmp) / f"{role}.onnx", cfg.opset)
                    except CompressError as exc:
                        for b in backends.values():
                            if b.runs == "onnx":
                                out.setdefault("notes", []).append(f"{role}: no {b.title} latency ({exc})")
        # What each backend runs, loaded once per role; an ONNX file is what ships: its PyTorch source is not timed.
        loaded: dict[str, dict[str, Any]] = {}
        for name, b in backends.items():
            if not b.available():
                out.setdefault("notes", []).append(f"{name}: not available on this machine")
                continue
            for role, s in pairs:
                source = onnx_files.get(role) if b.runs == "onnx" else s.model if s.onnx is None else None
                if source is not None:
                    loaded.setdefault(name, {})[role] = b.load(source, cfg.threads)
        total = len(backends) * len(cfg.batch_sizes) * cfg.runs
        with tqdm(total=total, desc=desc, leave=False, disable=None if cfg.progress else True) as bar:  # None: off when not a terminal
            for name, b in backends.items():
                for bs in cfg.batch_sizes:
                    roles = loaded.get(name, {})
                    if "subject" not in roles:
                        bar.update(cfg.runs)
                        continue
                    x = batch_of(data, bs)
                    timers = {role: b.timer(m, x) for role, m in roles.items()}
                    clock = "wall" if b.clock else cfg.clock if cfg.clock != "auto" else (
                        "cpu" if cfg.threads == 1 else "wall")
                    res = time_interleaved(timers, cfg.runs, cfg.warmup, cfg.min_sample_ms, clock, bar, cfg.max_seconds)
                    row = res["subject"]
                    if b.clock:
                        row["clock"] = b.clock
                    if "baseline" in res:
                        row["baseline_median_ms"] = res["baseline"]["median_ms"]
                        row["speedup"] = round(res["baseline"]["median_ms"] / max(row["median_ms"], 1e-9), 4)
                    elif baseline is None:
                        row["speedup"] = 1.0  # this is the baseline
                    out.setdefault(name, {})[str(bs)] = row
    return out


def interleaved_latency(paths: dict[str, Path], x: np.ndarray, *, threads: int = 1, warmup: int = 20,
                        rounds: int = 30, reps: int = 10) -> dict[str, float]:
    """Median wall-clock ms per batch for each ONNX file, timed in rounds that visit every model in turn
    so that machine noise hits them alike (``reps`` calls per sample, ``warmup`` calls per model first)."""
    ort = BACKENDS.get("onnxruntime").obj()
    timers = {k: ort.timer(ort.load(p, threads), torch.from_numpy(x)) for k, p in paths.items()}
    res = time_interleaved(timers, rounds, math.ceil(warmup / reps), clock="wall", reps=reps)
    return {k: r["median_ms"] for k, r in res.items()}
