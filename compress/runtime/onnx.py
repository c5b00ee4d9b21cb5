"""ONNX files: export (``to_onnx``), ONNX Runtime sessions, and metrics of a file run in ORT.

``onnx_session`` is the one place compress sets ORT session options.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from compress.errors import CompressError


class _Positional(nn.Module):
    """Named inputs as positional arguments: the TorchScript exporter maps a dict of keyword arguments
    onto the forward's signature, and ``IOModule.forward(x, **kwargs)`` names none of them."""

    def __init__(self, model: nn.Module, names: list[str]):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self.model(dict(zip(self.names, tensors)))


def _export_io(model: nn.Module, example, dynamic_batch: bool) -> tuple[nn.Module, tuple, list[str], Optional[dict]]:
    """(args, input names, dynamic axes): one tensor is ``input``; named inputs (a dict) keep their names,
    in the order the model's adapter declares, with dynamic batch and sequence axes."""
    if not isinstance(example, dict):
        axes = {"input": {0: "batch"}, "output": {0: "batch"}} if dynamic_batch else None
        return model, (example.cpu(),), ["input"], axes
    from compress.models.adapter import adapter_of

    order = adapter_of(model).inputs or tuple(example)
    names = [n for n in order if n in example]
    declared = adapter_of(model).dynamic_axes
    axes = {n: declared.get(n) or ({0: "batch", 1: "sequence"} if example[n].ndim == 2 else {0: "batch"}) for n in names}
    axes = {**axes, "output": {0: "batch"}} if dynamic_batch else None
    return _Positional(model, names), tuple(example[n].cpu() for n in names), names, axes


def to_onnx(model: nn.Module, example, path: str | Path, opset: int = 17, dynamic_batch: bool = True) -> Path:
    """Write ``model`` as ONNX with the TorchScript exporter (fast, no onnxscript rewrite).

    ``example``: one tensor, or a dict of named inputs (``input_ids``, ``attention_mask``): those become
    the graph's inputs, with dynamic batch and sequence axes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was = model.training
    model.eval()
    traced, args, names, axes = _export_io(model, example, dynamic_batch)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    # Under no_grad nn.MultiheadAttention (torchvision's ViT) takes a fused fast path that has no ONNX
    # export; the plain path computes the same, and exports.
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(traced, args, str(path), dynamo=False, opset_version=opset,
                              input_names=names, output_names=["output"], dynamic_axes=axes)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CompressError(f"cannot export {type(model).__name__} to ONNX (opset {opset}): {type(exc).__name__}: {first}") from None
    finally:
        model.train(was)
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return path


def onnx_session(path: str | Path | bytes, threads: Optional[int] = 1, optimize: bool = True):
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
        return ort.InferenceSession(path if isinstance(path, bytes) else str(path), so, providers=["CPUExecutionProvider"])
    except Exception as exc:
        where = "ONNX model" if isinstance(path, bytes) else path
        raise CompressError(f"{where}: ONNX Runtime cannot load it: {str(exc).splitlines()[0]}") from None


def onnx_feed(session, x) -> dict[str, np.ndarray]:
    """A session's inputs for one batch: a tensor feeds the single input, a dict feeds the inputs by name."""
    if isinstance(x, dict):
        wanted = {i.name for i in session.get_inputs()}
        return {k: v.detach().cpu().numpy() for k, v in x.items() if k in wanted}
    return {session.get_inputs()[0].name: x.detach().cpu().numpy()}


def onnx_run(session, x) -> np.ndarray:
    """Run one batch (``onnx_feed``); the first output."""
    return session.run(None, onnx_feed(session, x))[0]


class OrtModel(nn.Module):
    """An ONNX file (or a serialized model's bytes) behind the nn.Module call interface, so ``evaluate``
    measures it unchanged."""

    def __init__(self, path: str | Path | bytes, threads: Optional[int] = None):
        super().__init__()
        self.path = None if isinstance(path, bytes) else Path(path)
        self.model_bytes = path if isinstance(path, bytes) else None
        self.sess = onnx_session(path, threads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(onnx_run(self.sess, x if isinstance(x, dict) else x.float()))


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
