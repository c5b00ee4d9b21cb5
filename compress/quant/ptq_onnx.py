"""Post-training int8 through ONNX Runtime: export, static QDQ or dynamic quantization, evaluation.

Everything numeric here is ONNX Runtime's own (``onnxruntime.quantization``); this module only
feeds it the recipe's data and runs the result.
"""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from compress.runtime.onnx import to_onnx
from compress.quant.int8 import Int8Format

CALIBRATION = ("minmax", "entropy", "percentile")


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | Path, opset: int = 17) -> Path:
    """Legacy (TorchScript) exporter: fast, and it maps torch's fake-quant ops to Q/DQ nodes."""
    with torch.no_grad():
        return to_onnx(model, example, path, opset)


class LoaderReader:
    """onnxruntime CalibrationDataReader over the first ``batches`` batches of a DataLoader."""

    def __init__(self, loader, batches: int, input_name: str = "input"):
        self.loader, self.batches, self.input_name = loader, batches, input_name
        self.rewind()

    def rewind(self) -> None:
        self._it, self._n = iter(self.loader), 0

    def get_next(self):
        if self._n >= self.batches:
            return None
        raw = next(self._it, None)
        if raw is None:
            return None
        self._n += 1
        if isinstance(raw[0], dict):  # named inputs (input_ids, attention_mask) keep their names and dtypes
            return {k: v.numpy() for k, v in raw[0].items()}
        return {self.input_name: raw[0].numpy().astype(np.float32)}


def _preprocess(src: Path, dst: Path) -> Path:
    """ORT's recommended shape inference + optimization before static quantization."""
    import tempfile

    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, dst = Path(src).resolve(), Path(dst).resolve()
    # When ORT's symbolic shape inference cannot finish (a BERT's sequence axis), it saves
    # "sym_shape_infer_temp.onnx" and a "<uuid>.data" file into the *working directory* before raising
    # (onnxruntime/tools/symbolic_shape_infer.py): run it from a scratch folder so nothing lands in the user's.
    with tempfile.TemporaryDirectory(prefix="compress-preprocess-") as scratch, _working_dir(scratch):
        for skip_symbolic in (False, True):  # without symbolic shapes ORT still optimizes the graph
            try:
                quant_pre_process(str(src), str(dst), skip_symbolic_shape=skip_symbolic)
                return dst
            except Exception:  # pre-processing is an optimization; quantization works without it
                continue
    return src


def quantize_static_onnx(fp32: Path, out: Path, loader, fmt: Int8Format = Int8Format(), *, batches: int,
                         method: str = "minmax", percentile: float = 99.999, preprocess: bool = True,
                         quantize_bias: bool = False, op_types: list[str] | None = None) -> Path:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static

    src = _preprocess(fp32, fp32.with_name(fp32.stem + "_pre.onnx")) if preprocess else fp32
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    extra = {"QuantizeBias": quantize_bias}
    if method == "percentile":
        extra["CalibPercentile"] = percentile
    with _quiet_per_channel_fallback():
        quantize_static(str(src), str(out), LoaderReader(loader, batches), quant_format=QuantFormat.QDQ,
                        per_channel=fmt.per_channel, reduce_range=fmt.reduce_range, calibrate_method=methods[method],
                        weight_type=_qtype(fmt.weight_type), activation_type=_qtype(fmt.activation_type),
                        op_types_to_quantize=op_types or None, extra_options=extra)
    return out


@contextlib.contextmanager
def _working_dir(path: str):
    """``contextlib.chdir`` (Python 3.11+) for the 3.10 this package supports."""
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


class _PerChannelFallback(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.getMessage().startswith("Axis ") and "is out-of-range for weight" in record.getMessage())


@contextlib.contextmanager
def _quiet_per_channel_fallback():
    """ORT logs one root-logger warning per 1-D weight (a transformer's LayerNorm scale feeding a Mul) for
    which per-channel quantization falls back to one scale: dozens of lines per ViT, none a user acts on."""
    root, quiet = logging.getLogger(), _PerChannelFallback()
    root.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)


def quantize_dynamic_onnx(fp32: Path, out: Path, fmt: Int8Format = Int8Format(), *,
                          op_types: list[str] | None = None) -> Path:
    from onnxruntime.quantization import quantize_dynamic

    quantize_dynamic(str(fp32), str(out), per_channel=fmt.per_channel, reduce_range=fmt.reduce_range,
                     weight_type=_qtype(fmt.weight_type), op_types_to_quantize=op_types or None)
    return out


def _qtype(name: str):
    from onnxruntime.quantization import QuantType

    return QuantType.QUInt8 if name == "uint8" else QuantType.QInt8


def op_counts(path: str | Path, optimized: bool = False) -> dict[str, int]:
    """Node types in the file, or in ORT's optimized graph (to see int8 kernels such as QLinearConv)."""
    import onnx

    if optimized:
        import tempfile

        import onnxruntime as ort

        with tempfile.TemporaryDirectory() as d:
            opts = ort.SessionOptions()
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
            opts.optimized_model_filepath = str(Path(d) / "opt.onnx")
            ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            graph = onnx.load(opts.optimized_model_filepath).graph
    else:
        graph = onnx.load(str(path)).graph
    counts: dict[str, int] = {}
    for node in graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts
