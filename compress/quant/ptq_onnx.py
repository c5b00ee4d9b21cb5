"""Post-training int8 through ONNX Runtime: export, static QDQ or dynamic quantization, evaluation.

Everything numeric here is ONNX Runtime's own (``onnxruntime.quantization``); this module only
feeds it the recipe's data and runs the result.
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from compress.errors import CompressError
from compress.runtime.onnx import onnx_session, to_onnx
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
                         quantize_bias: bool = False, op_types: list[str] | None = None,
                         scratch: Optional[Path] = None, input_name: str = "input") -> Path:
    """``scratch``: the folder for the pre-processed copy (default: beside ``out``), never the source's;
    ``input_name``: the graph input a single-tensor batch feeds."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static

    pre = Path(scratch or out.parent) / (fp32.stem + "_pre.onnx")
    src = _preprocess(fp32, pre) if preprocess else fp32
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    extra = {"QuantizeBias": quantize_bias}
    if method == "percentile":
        extra["CalibPercentile"] = percentile
    with _quiet_per_channel_fallback():
        quantize_static(str(src), str(out), LoaderReader(loader, batches, input_name), quant_format=QuantFormat.QDQ,
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
                          op_types: list[str] | None = None, nodes_to_exclude: list[str] | None = None) -> Path:
    from onnxruntime.quantization import quantize_dynamic

    quantize_dynamic(str(fp32), str(out), per_channel=fmt.per_channel, reduce_range=fmt.reduce_range,
                     weight_type=_qtype(fmt.weight_type), op_types_to_quantize=op_types or None,
                     nodes_to_exclude=nodes_to_exclude or None)
    return out


# Nodes of a file that is already quantized (QDQ, QOperator or dynamic): quantizing it again means nothing.
QUANTIZED_OPS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
                 "MatMulInteger", "ConvInteger", "QGemm", "QLinearAdd", "QLinearMul")


@dataclass(frozen=True)
class FloatInput:
    """The one input of a user's float32 ONNX file; ``shape`` holds None for a named (dynamic) axis."""

    name: str
    shape: Optional[tuple]  # None: the file does not say its rank

    @property
    def batch(self) -> Optional[int]:
        """The batch size the file is fixed to (``torch.onnx.export`` without dynamic axes), or None."""
        return self.shape[0] if self.shape and self.shape[0] else None

    def words(self) -> str:
        dims = "?" if self.shape is None else ", ".join("batch" if i == 0 and d is None else "?" if d is None else str(d)
                                                        for i, d in enumerate(self.shape))
        return f"float32 ({dims})"

    def fits(self, sample_shape: tuple) -> bool:
        """Whether samples of ``sample_shape`` (no batch axis) fit the input's fixed axes."""
        if self.shape is None:
            return True
        return len(sample_shape) == len(self.shape) - 1 and all(d is None or d == s for d, s in zip(self.shape[1:], sample_shape))


def float_input(path: Path) -> FloatInput:
    """The input of a float32 ONNX model compress can quantize, or one CompressError line saying why not:
    not ONNX, external data, already quantized, not exactly one float32 input, or ONNX Runtime cannot load it."""
    import onnx

    if not path.is_file():
        raise CompressError(f"{path}: no such file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError on anything that is not an ONNX protobuf
        raise CompressError(f"{path}: not an ONNX model ({type(exc).__name__})") from None
    graph = model.graph
    if not graph.node:
        raise CompressError(f"{path}: not an ONNX model (no graph nodes)")
    from compress.packfile import refuse_external_data

    refuse_external_data(model, path, "ONNX Runtime's quantizer does not read here")
    quantized = sorted({n.op_type for n in graph.node if n.op_type in QUANTIZED_OPS})
    if quantized:
        raise CompressError(f"{path}: already quantized ({', '.join(quantized)} nodes); give the float model")
    weights = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in weights]  # older exporters list weights as inputs too
    if len(inputs) != 1:
        raise CompressError(f"{path}: {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); "
                            "expected one float32 input (images, features)")
    inp = inputs[0]
    t = inp.type.tensor_type if inp.type.HasField("tensor_type") else None
    if t is None or t.elem_type != onnx.TensorProto.FLOAT:
        kind = onnx.TensorProto.DataType.Name(t.elem_type).lower() if t is not None else inp.type.WhichOneof("value")
        raise CompressError(f"{path}: no float input (input '{inp.name}' is {kind}); expected one float32 input "
                            "(images, features): int8 calibration runs the model on float data")
    shape = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in t.shape.dim) \
        if t.HasField("shape") else None
    onnx_session(path, 1)  # malformed graphs: ONNX Runtime's own one-line reason
    return FloatInput(inp.name, shape)


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
