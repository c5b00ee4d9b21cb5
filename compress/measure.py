"""What every stage's output is measured by: task metrics, size (raw and zipped), parameters,
non-zeros, bits per weight, MACs, and latency in PyTorch eager and ONNX Runtime.

Latency is always a *ratio to a baseline measured in the same process*: baseline and candidate
samples are interleaved (A B B A A B ...) so load from other processes hits both alike.
"""
from __future__ import annotations

import contextlib
import copy
import io
import math
import os
import platform
import tempfile
import time
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Optional

import numpy as np
import torch
import torch.nn as nn
from pydantic import Field, field_validator
from tqdm.auto import tqdm

from compress.config import StrictModel
from compress.errors import CompressError

Backend = Literal["pytorch", "onnxruntime"]


class BenchmarkConfig(StrictModel):
    """The recipe's ``benchmark:`` section. Defaults keep a small model's row to a few seconds."""

    split: Literal["test", "val"] = "test"
    latency: bool = True
    backends: list[Backend] = Field(default_factory=lambda: ["pytorch", "onnxruntime"])
    batch_sizes: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [1, 32], min_length=1)
    runs: int = Field(100, ge=5)  # timed samples per model, backend and batch size
    warmup: int = Field(20, ge=0)  # untimed samples per model first (first-round timings ran ~5% slow with 10)
    # cpu: the calling thread's CPU time, immune to other processes on a shared machine (one thread
    # only); wall: perf_counter. auto: cpu when threads is 1, else wall.
    clock: Literal["auto", "wall", "cpu"] = "auto"
    threads: int = Field(1, ge=1)  # intra-op threads for both backends: fixed so runs compare
    min_sample_ms: float = Field(5.0, ge=0)  # a sample repeats a fast call until it lasts this long
    max_seconds: float = Field(15.0, gt=0)  # per backend and batch size: slow models get fewer runs (>= 10)
    gpu: bool = True  # also time PyTorch on CUDA (CUDA events) when a GPU exists
    macs: bool = True
    zipped: bool = True
    opset: int = Field(17, ge=7, le=20)  # for the temporary ONNX of a model that has none
    progress: bool = True

    @field_validator("batch_sizes")
    @classmethod
    def _unique(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError(f"expected distinct batch sizes, got {v}")
        return v


# -- size and parameters ---------------------------------------------------------------------------

def count_params(model: nn.Module) -> tuple[int, int]:
    """(parameters, non-zero parameters), counting each shared tensor once."""
    seen, total, nonzero = set(), 0, 0
    for p in list(model.parameters()) + [b for n, b in model.named_buffers() if n.endswith("weight_packed")]:
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        nonzero += int(torch.count_nonzero(p.detach()))
    return total, nonzero


def file_size(path: str | Path) -> int:
    return Path(path).stat().st_size


def saved_size(model: nn.Module) -> int:
    """Bytes of the model's checkpoint, for models that were never written to a run directory."""
    from compress.checkpoint import save_model

    with tempfile.TemporaryDirectory() as d:
        return file_size(save_model(model, Path(d) / "model.pt"))


def zipped_size(path: str | Path) -> int:
    """Bytes of ``path`` in a deflate zip (level 9): what pruned or clustered weights really cost to ship."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        z.write(path, Path(path).name)
    return buf.getbuffer().nbytes


def saved_zipped_size(model: nn.Module) -> int:
    from compress.checkpoint import save_model

    with tempfile.TemporaryDirectory() as d:
        return zipped_size(save_model(model, Path(d) / "model.pt"))


def bits_per_weight(size_bytes: int, params: int) -> Optional[float]:
    """Storage bits per parameter, file overhead included (32+ for float32, ~8 for int8 weights)."""
    return round(8 * size_bytes / params, 3) if params else None


def onnx_params(path: str | Path) -> tuple[int, int]:
    """(parameters, non-zeros) of an ONNX file: its initializers, less scalars (scales, zero points)."""
    import onnx
    from onnx import numpy_helper

    total = nonzero = 0
    for init in onnx.load(str(path)).graph.initializer:
        arr = numpy_helper.to_array(init)
        if arr.ndim == 0 or arr.dtype.kind not in "fiu":
            continue
        total += arr.size
        nonzero += int(np.count_nonzero(arr))
    return total, nonzero


def count_macs(model: nn.Module, example: torch.Tensor, *, strict: bool = False) -> tuple[Optional[int], int]:
    """(multiply-accumulates, parameters) of one sample: torch-pruning's counter (conv/linear MACs plus
    elementwise ops). Dense count: zeros left by unstructured pruning are still counted, as a dense kernel runs them.

    A model the counter cannot trace gives ``(None, parameters)`` and a warning, so a report row still comes
    out; ``strict`` raises instead (pruning's budgets need the number).
    """
    import torch_pruning as tp

    was = model.training
    try:
        with torch.no_grad():
            macs, params = tp.utils.count_ops_and_params(model.eval(), example[:1].to(next(model.parameters()).device))
        return int(macs), int(params)
    except Exception as exc:  # custom modules the counter cannot trace: report no number rather than fail the run
        if strict:
            raise
        warnings.warn(f"MACs not counted: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        return None, sum(p.numel() for p in model.parameters())
    finally:
        model.train(was)


def layer_stats(model: nn.Module) -> list[dict]:
    """Per weight tensor (2-D and up): parameters and the share of zeros, for per-layer plots."""
    out = []
    for name, p in model.named_parameters():
        if p.ndim >= 2 and name.endswith("weight"):
            n = p.numel()
            out.append({"name": name.removesuffix(".weight"), "params": n,
                        "sparsity": round(1 - int(torch.count_nonzero(p.detach())) / n, 4)})
    return out


# -- ONNX helpers ----------------------------------------------------------------------------------

def to_onnx(model: nn.Module, example: torch.Tensor, path: str | Path, opset: int = 17, dynamic_batch: bool = True) -> Path:
    """Write ``model`` as ONNX with the TorchScript exporter (fast, no onnxscript rewrite)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was = model.training
    model.eval()
    axes = {"input": {0: "batch"}, "output": {0: "batch"}} if dynamic_batch else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example.cpu(),), str(path), dynamo=False, opset_version=opset,
                              input_names=["input"], output_names=["output"], dynamic_axes=axes)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CompressError(f"cannot export {type(model).__name__} to ONNX (opset {opset}): {type(exc).__name__}: {first}") from None
    finally:
        model.train(was)
    return path


def onnx_session(path: str | Path, threads: Optional[int] = 1, optimize: bool = True):
    """A CPU session with ``threads`` intra-op threads (None: ONNX Runtime's default, one per core).

    The one place compress opens ONNX Runtime sessions: int8 files need no session option to be right
    (``compress.quant.int8``), so a user's plain ``InferenceSession`` computes what we measured.
    ``optimize=False`` runs the graph as written: a QDQ file then runs as float ops (ORT's float simulation).
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise CompressError(f"{path}: ONNX Runtime cannot load it: {str(exc).splitlines()[0]}") from None


def onnx_run(session, x: torch.Tensor) -> np.ndarray:
    inp = session.get_inputs()[0]
    return session.run(None, {inp.name: x.detach().cpu().numpy()})[0]


class OrtModel(nn.Module):
    """An ONNX file behind the nn.Module call interface, so ``evaluate`` measures it unchanged."""

    def __init__(self, path: str | Path, threads: Optional[int] = None):
        super().__init__()
        self.path = Path(path)
        self.sess = onnx_session(path, threads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(onnx_run(self.sess, x.float()))


def evaluate_onnx(path: str | Path, data, split: str = "test", threads: int | None = None) -> dict[str, float]:
    """Task metrics of an ONNX file in ONNX Runtime, the same way ``evaluate`` computes them."""
    from compress.metrics import LOSSES, MetricAccumulator, default_loss

    sess = onnx_session(path, threads or max(1, torch.get_num_threads()))
    loss_fn = LOSSES[default_loss(data.task)]
    acc = MetricAccumulator(data.task)
    for raw in data.loader(split, shuffle=False):
        x, y = raw[0], raw[1]
        out = torch.from_numpy(onnx_run(sess, x))
        acc.update(out, y, loss_fn(out, y))
    return acc.compute()


# -- latency ---------------------------------------------------------------------------------------

@contextlib.contextmanager
def torch_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class Timer:
    """One thing to time: ``timed(k)`` runs it ``k`` times and returns (wall seconds, CPU seconds).

    CPU seconds are the calling thread's: with one intra-op thread both PyTorch and ONNX Runtime
    compute on the caller, so that clock leaves out the time the OS gives to other processes.
    """

    def __init__(self, fn: Callable[[], Any], cuda: bool = False):
        self.fn, self.cuda = fn, cuda

    def timed(self, k: int) -> tuple[float, float]:
        if self.cuda:  # CUDA events: kernel time on the device, not the host's launch time
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(k):
                self.fn()
            end.record()
            torch.cuda.synchronize()
            t = start.elapsed_time(end) / 1000
            return t, t
        t0, c0 = time.perf_counter(), time.thread_time()
        for _ in range(k):
            self.fn()
        return time.perf_counter() - t0, time.thread_time() - c0


def torch_timer(model: nn.Module, x: torch.Tensor, device: str = "cpu") -> Timer:
    model = model.eval()

    def fn():
        with torch.inference_mode():
            model(x)

    return Timer(fn, cuda=device.startswith("cuda"))


def onnx_timer(session, x: torch.Tensor) -> Timer:
    feed = {session.get_inputs()[0].name: x.detach().cpu().numpy()}
    return Timer(lambda: session.run(None, feed))


def stats_ms(samples: list[float]) -> dict:
    a = np.asarray(samples) * 1000
    return {"median_ms": round(float(np.median(a)), 5), "p90_ms": round(float(np.percentile(a, 90)), 5),
            "p99_ms": round(float(np.percentile(a, 99)), 5), "mean_ms": round(float(a.mean()), 5)}


def time_interleaved(timers: dict[str, Timer], runs: int, warmup: int, min_sample_ms: float = 0.0,
                     clock: str = "wall", bar: Optional[tqdm] = None, max_seconds: float = float("inf")) -> dict[str, dict]:
    """Time every timer ``runs`` times, interleaved in alternating order; per-call statistics.

    A sample repeats a call ``k`` times (``k`` set so it lasts ``min_sample_ms``) because one sub-
    millisecond call is below the clock's and scheduler's noise. ``clock`` is "wall" or "cpu".
    Runs shrink (not below 10) to fit ``max_seconds``.
    """
    names = list(timers)
    reps, est = {}, 0.0
    for n in names:
        one = min(timers[n].timed(1)[0] for _ in range(3))
        reps[n] = max(1, math.ceil(min_sample_ms / 1000 / max(one, 1e-7)))
        est += one * reps[n]
    planned = runs
    if math.isfinite(max_seconds):
        runs = max(min(runs, 10), min(runs, int(max_seconds / max(est, 1e-9)) - warmup))
    if bar is not None and planned > runs:
        bar.update(planned - runs)
    for _ in range(warmup):
        for n in names:
            timers[n].timed(reps[n])
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for i in range(runs):
        shift = i % len(names)
        for n in names[shift:] + names[:shift]:
            w, c = timers[n].timed(reps[n])
            wall[n].append(w / reps[n])
            cpu[n].append(c / reps[n])
        if bar is not None:
            bar.update(1)
    out = {}
    for n in names:
        main, other = (cpu[n], wall[n]) if clock == "cpu" else (wall[n], cpu[n])
        out[n] = {**stats_ms(main), "clock": clock, f"{'wall' if clock == 'cpu' else 'cpu'}_median_ms":
                  stats_ms(other)["median_ms"], "runs": runs, "calls_per_sample": reps[n]}
    return out


def interleaved_latency(paths: dict[str, Path], x: np.ndarray, *, threads: int = 1, warmup: int = 20,
                        rounds: int = 30, reps: int = 10) -> dict[str, float]:
    """Median wall-clock ms per batch for each ONNX file, timed in rounds that visit every model in turn
    so that machine noise hits them alike (``reps`` calls per sample, ``warmup`` calls per model first)."""
    timers = {k: onnx_timer(onnx_session(p, threads), torch.from_numpy(x)) for k, p in paths.items()}
    for t in timers.values():
        t.timed(warmup)
    times: dict[str, list[float]] = {k: [] for k in timers}
    for _ in range(rounds):
        for k, t in timers.items():
            times[k].append(t.timed(reps)[0] / reps * 1000)
    return {k: float(np.median(v)) for k, v in times.items()}


def batch_of(data, batch: int) -> torch.Tensor:
    """A real batch of exactly ``batch`` samples (repeated when the split is smaller)."""
    x = data.example_input(batch)
    if x.shape[0] < batch:
        x = x.repeat(math.ceil(batch / x.shape[0]), *([1] * (x.ndim - 1)))[:batch]
    return x


@dataclass
class Subject:
    """What a report row describes: a PyTorch model, an ONNX file, or both, and the file to size."""

    model: Optional[nn.Module] = None
    onnx: Optional[Path] = None
    file: Optional[Path] = None

    @classmethod
    def load(cls, path: str | Path) -> "Subject":
        """A ``.onnx`` file or a compress checkpoint (``.pt``)."""
        path = Path(path)
        if not path.is_file():
            raise CompressError(f"{path}: no such model file")
        if path.suffix == ".onnx":
            return cls(None, path, path)
        from compress.checkpoint import load_model

        return cls(load_model(path), None, path)

    @classmethod
    def from_row(cls, row: dict) -> Optional["Subject"]:
        """Reload a finished stage (the baseline) from the files its report row names."""
        model = None
        if row.get("model_file") and Path(row["model_file"]).is_file():
            try:
                from compress.checkpoint import load_model

                model = load_model(row["model_file"])
            except CompressError:
                model = None
        art = Path(row["artifact"]) if row.get("artifact") else None
        onnx = art if art is not None and art.suffix == ".onnx" and art.is_file() else None
        if model is None and onnx is None:
            return None
        return cls(model, onnx, art)


def measure_latency(subject: Subject, data, cfg: BenchmarkConfig, baseline: Optional[Subject] = None,
                    desc: str = "latency") -> dict:
    """Latency of ``subject`` per backend and batch size, interleaved with ``baseline`` when given.

    Returns ``{"threads", "runs", <backend>: {<batch>: {median_ms, p90_ms, p99_ms, ..., speedup}}}``;
    speedup is baseline median / subject median from the same interleaved samples.
    """
    backends = list(cfg.backends)
    if cfg.gpu and torch.cuda.is_available():
        backends.append("cuda")
    out: dict[str, Any] = {"threads": cfg.threads, "runs": cfg.runs}
    pairs = [("subject", subject)] + ([("baseline", baseline)] if baseline is not None else [])
    with tempfile.TemporaryDirectory() as tmp, torch_threads(cfg.threads):
        sessions: dict[str, Any] = {}
        for role, s in pairs:
            onnx_path = s.onnx
            if onnx_path is None and s.model is not None and "onnxruntime" in backends:
                try:
                    onnx_path = to_onnx(s.model.cpu(), batch_of(data, 1), Path(tmp) / f"{role}.onnx", cfg.opset)
                except CompressError as exc:
                    out.setdefault("notes", []).append(f"{role}: no ONNX Runtime latency ({exc})")
            if onnx_path is not None:
                sessions[role] = onnx_session(onnx_path, cfg.threads)
        # Fresh copies for both roles: a model trained in this process and one just loaded lie differently
        # in memory, which alone shifted timings by ~5% in benchmarks/latency_stability.py.
        copies = {role: copy.deepcopy(s.model).cpu().eval() for role, s in pairs
                  if s.model is not None and s.onnx is None and "pytorch" in backends}
        total = len(backends) * len(cfg.batch_sizes) * cfg.runs
        with tqdm(total=total, desc=desc, leave=False, disable=None if cfg.progress else True) as bar:  # None: off when not a terminal
            for backend in backends:
                for bs in cfg.batch_sizes:
                    x = batch_of(data, bs)
                    timers = {}
                    for role, s in pairs:
                        if backend == "onnxruntime" and role in sessions:
                            timers[role] = onnx_timer(sessions[role], x)
                        elif s.model is None or s.onnx is not None:
                            continue  # an ONNX file is what ships: its PyTorch source is not timed
                        elif backend == "pytorch":
                            timers[role] = torch_timer(copies[role], x)
                        elif backend == "cuda":
                            timers[role] = torch_timer(copy.deepcopy(s.model).cuda(), x.cuda(), "cuda")
                    if "subject" not in timers:
                        bar.update(cfg.runs)
                        continue
                    clock = "wall" if backend == "cuda" else cfg.clock if cfg.clock != "auto" else (
                        "cpu" if cfg.threads == 1 else "wall")
                    res = time_interleaved(timers, cfg.runs, cfg.warmup, cfg.min_sample_ms, clock, bar, cfg.max_seconds)
                    row = res["subject"]
                    if backend == "cuda":
                        row["clock"] = "cuda events"
                    if "baseline" in res:
                        row["baseline_median_ms"] = res["baseline"]["median_ms"]
                        row["speedup"] = round(res["baseline"]["median_ms"] / max(row["median_ms"], 1e-9), 4)
                    elif baseline is None:
                        row["speedup"] = 1.0  # this is the baseline
                    out.setdefault(backend, {})[str(bs)] = row
    return out


# -- one row ---------------------------------------------------------------------------------------

def measure(subject: Subject, data, cfg: BenchmarkConfig | None = None, *, metrics: dict | None = None,
            baseline: Optional[Subject] = None, desc: str = "measure") -> dict:
    """Every measure of one model for a report row (keys as in ``report.json``)."""
    cfg = cfg or BenchmarkConfig()
    split = cfg.split if data.has(cfg.split) else "val"
    model = subject.model
    if metrics is None:
        if model is not None:
            from compress.trainer import evaluate

            metrics = evaluate(model, data, split)
        elif subject.onnx is not None:
            metrics = evaluate_onnx(subject.onnx, data, split)
        else:
            raise CompressError("nothing to measure: no model and no ONNX file")
    f = subject.file
    size = file_size(f) if f else saved_size(model)
    params, nonzero = count_params(model) if model is not None else onnx_params(subject.onnx)
    row: dict[str, Any] = {"metrics": metrics, "split": split, "size_bytes": size}
    if cfg.zipped:
        row["zipped_bytes"] = zipped_size(f) if f else saved_zipped_size(model)
    row.update(params=params, nonzero_params=nonzero, bits_per_weight=bits_per_weight(size, params))
    if cfg.zipped:
        row["zipped_bits_per_weight"] = bits_per_weight(row["zipped_bytes"], params)
    if cfg.macs and model is not None:
        row["macs"] = count_macs(model, batch_of(data, 1))[0]
    if model is not None:
        row["layers"] = layer_stats(model)
    if cfg.latency:
        row["latency"] = measure_latency(subject, data, cfg, baseline, f"latency {desc}")
    return row


def benchmark(model, config: BenchmarkConfig | None = None, data=None, *, baseline=None):
    """Measure one model (an ``nn.Module``, a ``.pt`` checkpoint or a ``.onnx`` file) on ``data``.

    Returns ``Result(model, row)``; with ``baseline`` (same kinds), latency is interleaved with it
    and ``row["latency"][backend][batch]["speedup"]`` is the ratio.
    """
    from compress.api import Result, as_data

    data = as_data(data)

    def subject(m):
        return m if isinstance(m, Subject) else Subject(m) if isinstance(m, nn.Module) else Subject.load(m)

    s = subject(model)
    row = measure(s, data, config, baseline=subject(baseline) if baseline is not None else None)
    return Result(s.model if s.model is not None else model, row)


def machine_info() -> dict:
    """The machine a report was measured on (also printed by every benchmark script)."""
    import onnxruntime

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from compress.quant.int8 import cpu_features

    feats = cpu_features()
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "int8_flags": feats["int8_flags"], "vnni": feats["vnni"],
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
