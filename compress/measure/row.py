"""One report row: every measure of one model (``measure``), and ``compress.benchmark(...)``."""
from __future__ import annotations

from typing import Any, Optional

import torch.nn as nn

from compress.api import Result, as_data
from compress.errors import CompressError
from compress.evaluation import evaluate
from compress.measure.config import BenchmarkConfig
from compress.measure.generation import lm_source, row_generation
from compress.measure.latency import measure_latency
from compress.measure.size import (bits_per_weight, count_macs, count_params, file_size, layer_stats, onnx_weights,
                                   saved_size, saved_zipped_size, weight_bytes, zipped_size)
from compress.measure.subject import Subject, batch_of
from compress.runtime.onnx import evaluate_onnx


def measure(subject: Subject, data, cfg: BenchmarkConfig | None = None, *, metrics: dict | None = None,
            baseline: Optional[Subject] = None, desc: str = "measure") -> dict:
    """Every measure of one model for a report row (keys as in ``report.json``).

    ``metrics``: the task metrics when the caller has them; else the model (or ONNX file) is evaluated.
    """
    cfg = cfg or BenchmarkConfig()
    split = cfg.split if data.has(cfg.split) else "val"
    model = subject.model
    lm = lm_source(model if subject.onnx is None else None, subject.onnx)  # a causal LM: generation speed too
    if metrics is None:
        if lm is not None and subject.onnx is not None:  # an LM file: perplexity of the file on token blocks
            from compress.runtime.generate import lm_blocks, onnx_perplexity

            metrics = {"perplexity": onnx_perplexity(subject.onnx, lm_blocks(data, split, 10 ** 9, "benchmark"))}
        elif model is not None:
            metrics = evaluate(model, data, split)
        elif subject.onnx is not None:
            metrics = evaluate_onnx(subject.onnx, data, split)
        else:
            raise CompressError("nothing to measure: no model and no ONNX file")
    f = subject.file
    size = file_size(f) if f else saved_size(model)
    # Counts of the file that is sized and shipped: an int8 ONNX file's weights, not its float model's
    # (weights rounded to zero are zeros there), so `compress bench` of the file agrees with the run's row.
    if subject.onnx is not None:
        params, nonzero, wbytes = onnx_weights(subject.onnx)
    else:
        (params, nonzero), wbytes = count_params(model), weight_bytes(model)
    row: dict[str, Any] = {"metrics": metrics, "split": split, "size_bytes": size}
    if cfg.zipped:
        row["zipped_bytes"] = zipped_size(f) if f else saved_zipped_size(model)
    # bits/weight counts the weights' bits alone (32 for float32); the file's bits/param include its overhead.
    row.update(params=params, nonzero_params=nonzero, weight_bits_per_weight=bits_per_weight(wbytes, params),
               file_bits_per_param=bits_per_weight(size, params))
    if cfg.zipped:
        row["zipped_bits_per_param"] = bits_per_weight(row["zipped_bytes"], params)
    if cfg.macs and model is not None:
        row["macs"] = count_macs(model, batch_of(data, 1))[0]
    if model is not None:
        row["layers"] = layer_stats(model)
    if cfg.latency:
        if lm is None or subject.onnx is None:  # an LM file takes a cache: its speed is generation speed
            row["latency"] = measure_latency(subject, data, cfg, baseline, f"latency {desc}")
        if lm is not None:
            base = lm_source(baseline.model if baseline.onnx is None else None, baseline.onnx) if baseline else None
            row["generation"] = row_generation(lm, base, threads=cfg.threads)
    return row


def benchmark(model, config: BenchmarkConfig | None = None, data=None, *, baseline=None):
    """Measure one model (an ``nn.Module``, a ``.pt`` checkpoint or a ``.onnx`` file) on ``data``.

    Returns ``Result(model, row)``; with ``baseline`` (same kinds), latency is interleaved with it
    and ``row["latency"][backend][batch]["speedup"]`` is the ratio.
    """
    data = as_data(data)

    def subject(m):
        return m if isinstance(m, Subject) else Subject(m) if isinstance(m, nn.Module) else Subject.load(m)

    s = subject(model)
    row = measure(s, data, config, baseline=subject(baseline) if baseline is not None else None)
    return Result(s.model if s.model is not None else model, row)
