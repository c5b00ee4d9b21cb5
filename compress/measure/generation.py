"""How fast a causal LM generates: prefill latency of a prompt and decode tokens/s with the key-value cache, in
ONNX Runtime (a file with a cache) and PyTorch eager, interleaved with a baseline (the fp32 ONNX file of the
same model) in one process, as every compress latency is (``compress.runtime.timing``).

A decode sample is one cached step of one new token per row after a ``prompt_tokens`` prefill; the cache is
rolled back after each step, so every sample decodes at the same past length.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Optional

import numpy as np

from compress.runtime.generate import prefill_inputs
from compress.runtime.lm_export import OrtLM, StepLM, TorchLM
from compress.runtime.timing import Timer, time_interleaved


@dataclass(frozen=True)
class GenerationSpeed:
    """One model's generation speed at one batch size and thread count (a report row's ``generation`` entry)."""

    name: str
    runtime: str  # onnxruntime | pytorch
    batch: int
    threads: int
    prompt_tokens: int
    prefill_ms: float  # median, the whole prompt of every row
    decode_ms: float  # median, one new token per row
    clock: str
    prefill_speedup: Optional[float] = None  # baseline median / this median (None: no baseline, or this is it)
    decode_speedup: Optional[float] = None

    @property
    def decode_tokens_per_s(self) -> float:
        return self.batch * 1000.0 / self.decode_ms if self.decode_ms > 0 else float("inf")

    def as_dict(self) -> dict:
        return {**asdict(self), "decode_tokens_per_s": round(self.decode_tokens_per_s, 2)}


def _threads(threads: Optional[int]) -> int:
    return threads or os.cpu_count() or 1


def _load(source, threads: int) -> StepLM:
    """An ORT session with ``threads`` intra-op threads, or the PyTorch model (its threads are set per call)."""
    import torch.nn as nn

    return TorchLM(source) if isinstance(source, nn.Module) else OrtLM(source, threads)


def _with_threads(fn, lm: StepLM, threads: int):
    if lm.runtime != "pytorch":
        return fn
    import torch

    def run():
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return fn()
        finally:
            torch.set_num_threads(old)

    return run


def generation_timers(lm: StepLM, batch: int, prompt_tokens: int, threads: int,
                      seed: int = 0) -> tuple[Timer, Timer]:
    """(prefill timer, decode-step timer) for ``lm`` on a random prompt of ``batch`` x ``prompt_tokens`` tokens."""
    vocab = lm.shape.vocab or 2
    ids = np.random.default_rng(seed).integers(0, vocab, (batch, prompt_tokens))
    x, mask, pos = prefill_inputs(ids)
    prefill = _with_threads(lambda: lm.step(x, mask, pos, lm.empty_cache(batch)), lm, threads)
    _, cache = prefill()
    tok = ids[:, -1:]
    dmask, dpos = np.ones((batch, prompt_tokens + 1), np.int64), np.full((batch, 1), prompt_tokens, np.int64)

    def decode():
        lm.step(tok, dmask, dpos, cache)
        if hasattr(cache, "crop"):  # transformers' DynamicCache grows in place: drop the step's token
            cache.crop(-1)

    return Timer(prefill), Timer(_with_threads(decode, lm, threads))


def measure_generation(models: dict[str, Any], *, baseline: Optional[str] = None, batches: Iterable[int] = (1,),
                       threads: Iterable[Optional[int]] = (1,), prompt_tokens: int = 128, runs: int = 20,
                       warmup: int = 3, clock: str = "auto", max_seconds: float = 30.0) -> list[GenerationSpeed]:
    """Prefill and decode speed of each model (an ONNX path with a cache, or a transformers causal LM), every
    model of one (batch, threads) timed interleaved; ``baseline`` names the model the speedups are against.

    ``threads``: intra-op threads; None is one per core. ``clock`` auto: CPU time at one thread, else wall."""
    out: list[GenerationSpeed] = []
    for t in dict.fromkeys(_threads(t) for t in threads):
        lms = {name: _load(src, t) for name, src in models.items()}
        how = clock if clock != "auto" else ("cpu" if t == 1 else "wall")
        for b in batches:
            timers: dict[str, Timer] = {}
            for name, lm in lms.items():
                timers[f"{name}\0prefill"], timers[f"{name}\0decode"] = generation_timers(lm, b, prompt_tokens, t)
            res = time_interleaved(timers, runs, warmup, min_sample_ms=0.0, clock=how, max_seconds=max_seconds)
            for name, lm in lms.items():
                p, d = res[f"{name}\0prefill"]["median_ms"], res[f"{name}\0decode"]["median_ms"]
                sp = sd = None
                if baseline is not None and baseline in lms and name != baseline:
                    sp = round(res[f"{baseline}\0prefill"]["median_ms"] / max(p, 1e-9), 3)
                    sd = round(res[f"{baseline}\0decode"]["median_ms"] / max(d, 1e-9), 3)
                out.append(GenerationSpeed(name, lm.runtime, b, t, prompt_tokens, round(p, 4), round(d, 4), how, sp, sd))
    return out


def generation_columns(speeds: list[dict], batch: int = 1, threads: int = 1) -> dict[str, str]:
    """Report columns of one LM row (its ``generation`` entries as dicts) at ``batch`` and ``threads``."""
    for s in speeds:
        if s["batch"] == batch and s["threads"] == threads:
            return {f"prefill {s['prompt_tokens']} tok (ms)": f"{s['prefill_ms']:.2f}",
                    "decode tok/s": f"{s['decode_tokens_per_s']:.1f}"}
    return {}


def format_generation(speeds: list[GenerationSpeed]) -> str:
    """A Markdown table of ``measure_generation``'s result."""
    lines = ["| model | runtime | batch | threads | prefill ms | decode ms/step | decode tok/s | vs baseline (prefill, decode) |",
             "|---|---|---|---|---|---|---|---|"]
    for s in speeds:
        vs = f"{s.prefill_speedup:.2f}x, {s.decode_speedup:.2f}x" if s.prefill_speedup else ""
        lines.append(f"| {s.name} | {s.runtime} | {s.batch} | {s.threads} | {s.prefill_ms:.2f} | {s.decode_ms:.3f} | "
                     f"{s.decode_tokens_per_s:.1f} | {vs} |")
    return "\n".join(lines)




def lm_source(model=None, onnx=None):
    """What generation is timed on for a report row: an ONNX file with a cache, else a transformers causal LM
    (bare or compress-wrapped) with a declared decoder layout; None for any other model."""
    from compress.runtime.lm_export import is_lm_file

    if onnx is not None:
        return onnx if is_lm_file(onnx) else None
    if model is None:
        return None
    from compress.models.decoder import decoder_layout
    from compress.runtime.lm_export import causal_lm

    try:
        return model if decoder_layout(causal_lm(model)) is not None else None
    except Exception:  # not a transformers causal LM
        return None


def row_generation(source, baseline=None, *, threads: int = 1, batches: Iterable[int] = (1,),
                   prompt_tokens: int = 128, runs: int = 20) -> list[dict]:
    """A report row's ``generation`` entries: ``source`` (and ``baseline``, interleaved) at ``batches``."""
    models = {"subject": source, **({"baseline": baseline} if baseline is not None else {})}
    speeds = measure_generation(models, baseline="baseline" if baseline is not None else None, batches=batches,
                                threads=(threads,), prompt_tokens=prompt_tokens, runs=runs)
    return [s.as_dict() for s in speeds if s.name == "subject"]


__all__ = ["GenerationSpeed", "format_generation", "generation_columns", "generation_timers", "lm_source",
           "measure_generation", "row_generation"]
