"""Latency backends: one registry entry per runtime a benchmark can time a model in.

A backend says what it runs (a PyTorch module or an ONNX file), loads it once per model and makes a
``Timer`` for a batch; ``compress.measure.latency`` does the rest (interleaving, baseline ratios). A
new runtime (TensorRT, OpenVINO) is one subclass registered under its name; the name is then valid in
the recipe's ``benchmark.backends``.
"""
from __future__ import annotations

import contextlib
import copy
import math
from typing import Any, Iterable, Literal, Optional

import torch
import torch.nn as nn

from compress.registry import Registry
from compress.runtime.onnx import onnx_feed
from compress.runtime.timing import Timer


class LatencyBackend:
    """How one runtime times a model: ``load`` once per model, then ``timer`` per batch."""

    runs: Literal["model", "onnx"] = "model"  # what it executes; models are exported first for "onnx"
    title = ""  # in report notes: "no <title> latency (...)"
    gpu = False  # timed without being listed when BenchmarkConfig.gpu is on and the backend is available
    clock: Optional[str] = None  # a clock of its own ("cuda events"); None: the benchmark's clock
    # Channel counts this runtime is fast at (channel pruning's default round_to): 1 where widths do not matter.
    preferred_round_to = 1

    def available(self) -> bool:
        return True

    def load(self, source: Any, threads: int) -> Any:
        """What ``timer`` runs: ``source`` is an nn.Module (``runs = "model"``) or an ONNX path."""
        raise NotImplementedError

    def timer(self, loaded: Any, x: torch.Tensor) -> Timer:
        raise NotImplementedError


BACKENDS: Registry[type[LatencyBackend]] = Registry("latency backend")


def preferred_round_to(names: Iterable[str]) -> tuple[int, list[str]]:
    """The channel multiple every named backend is fast at (their least common multiple), and which backends
    asked for more than 1: channel pruning's default ``round_to`` for the recipe's ``benchmark.backends``."""
    prefs = {n: BACKENDS.get(n).obj.preferred_round_to for n in names}
    return math.lcm(1, *prefs.values()), [n for n, r in prefs.items() if r > 1]


@contextlib.contextmanager
def torch_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class CudaTimer(Timer):
    """CUDA events: kernel time on the device, not the host's launch time (reported as both clocks)."""

    def timed(self, k: int) -> tuple[float, float]:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(k):
            self.fn()
        end.record()
        torch.cuda.synchronize()
        t = start.elapsed_time(end) / 1000
        return t, t


def torch_timer(model: nn.Module, x: torch.Tensor, device: str = "cpu") -> Timer:
    model = model.eval()

    def fn():
        with torch.inference_mode():
            model(x)

    return (CudaTimer if device.startswith("cuda") else Timer)(fn)


def onnx_timer(session, x) -> Timer:
    """Times ``session`` on ``x``: one tensor, or named inputs (``input_ids``...) fed by name (``onnx_feed``)."""
    feed = onnx_feed(session, x)
    return Timer(lambda: session.run(None, feed))


@BACKENDS.register("pytorch")
class PyTorchBackend(LatencyBackend):
    """PyTorch eager on the CPU."""

    title = "PyTorch"

    def load(self, source: nn.Module, threads: int) -> nn.Module:
        # A fresh copy: a model trained in this process and one just loaded lie differently in memory,
        # which alone shifted timings by ~5% in benchmarks/latency_stability.py.
        return copy.deepcopy(source).cpu().eval()

    def timer(self, loaded: nn.Module, x: torch.Tensor) -> Timer:
        return torch_timer(loaded, x)


@BACKENDS.register("onnxruntime")
class OnnxRuntimeBackend(LatencyBackend):
    """ONNX Runtime's CPU execution provider."""

    runs = "onnx"
    title = "ONNX Runtime"
    # Its CPU conv/GEMM kernels (MLAS, fp32 and int8) work in blocks of 8 channels: the model matrix ran free
    # pruned widths at 0.42-0.65x of the unpruned model's speed, multiples of 8 at up to 2x (issue 25).
    preferred_round_to = 8

    def load(self, source, threads: int):
        from compress.runtime.onnx import onnx_session

        return onnx_session(source, threads)

    def timer(self, loaded, x: torch.Tensor) -> Timer:
        return onnx_timer(loaded, x)


@BACKENDS.register("cuda")
class CudaBackend(LatencyBackend):
    """PyTorch eager on the GPU, timed with CUDA events."""

    title = "CUDA"
    gpu = True
    clock = "cuda events"

    def available(self) -> bool:
        return torch.cuda.is_available()

    def load(self, source: nn.Module, threads: int) -> nn.Module:
        return copy.deepcopy(source).cuda()

    def timer(self, loaded: nn.Module, x: torch.Tensor) -> Timer:
        return torch_timer(loaded, x.cuda(), "cuda")
