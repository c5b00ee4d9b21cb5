"""Post-training int8 in ONNX Runtime: ``ptq_static`` (calibrated QDQ) and ``ptq_dynamic``.

The PyTorch model is left untouched; the handler returns an ``OrtModel`` running the int8 file.
"""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from compress.config import StrictModel
from compress.evaluation import evaluate
from compress.quant import ptq_onnx
from compress.quant.methods.base import (Int8FileOptions, QuantContext, check_int8_file, needs_bits,
                                        register_method)
from compress.runtime.onnx import OrtModel, onnx_run, onnx_session


class CalibrationConfig(StrictModel):
    method: Literal["minmax", "entropy", "percentile"] = "minmax"
    batches: int = Field(8, ge=1)  # batches of the training split fed to ONNX Runtime's calibrator
    batch_size: Optional[int] = Field(None, ge=1)
    percentile: float = Field(99.999, gt=0, le=100)


class PTQDynamicConfig(Int8FileOptions):
    """int8 weights, activations quantized at run time (ORT ``quantize_dynamic``): for Linear/RNN-heavy models."""

    method: Literal["ptq_dynamic"] = "ptq_dynamic"
    # Quantize only these ONNX op types (ORT's op_types_to_quantize), e.g. [Gemm, MatMul]: on tiny
    # convolutions ORT's int8 kernels are slower than fp32, while the weights sit in the dense layers.
    op_types: Optional[list[str]] = None

    def check_rules(self, path: str) -> None:
        needs_bits(self, path, (8,), f"{self.method} quantizes to int8 in ONNX Runtime")
        self.int8_format(path)


class PTQStaticConfig(PTQDynamicConfig):
    """Calibrated int8 QDQ (ORT ``quant_pre_process`` + ``quantize_static``) on training batches."""

    method: Literal["ptq_static"] = "ptq_static"
    calibration: CalibrationConfig = CalibrationConfig()
    preprocess: bool = True  # onnxruntime's quant_pre_process before static quantization
    # False keeps biases float in the file: ORT still fuses QLinearConv/QGemm (it quantizes them at
    # load) and the file drops each layer's int32 bias, bias scale and bias zero point.
    quantize_bias: bool = False


def _ptq(model, cfg: PTQDynamicConfig, ctx: QuantContext):
    data = ctx.data
    fp32 = ptq_onnx.export_onnx(model.cpu(), data.example_input(1), ctx.out_dir / "model_fp32.onnx", cfg.opset)
    out = ctx.out_dir / "model_int8.onnx"
    fmt = cfg.int8_format(ctx.path)
    facts = {"method": cfg.method, "bits": 8}
    if isinstance(cfg, PTQStaticConfig):
        bs = cfg.calibration.batch_size or data.batch_size
        loader = data.loader("train", shuffle=False, batch_size=bs)
        ptq_onnx.quantize_static_onnx(fp32, out, loader, fmt, batches=cfg.calibration.batches,
                                      method=cfg.calibration.method, percentile=cfg.calibration.percentile,
                                      preprocess=cfg.preprocess, quantize_bias=cfg.quantize_bias,
                                      op_types=cfg.op_types)
        facts["calibration"] = cfg.calibration.method
    else:
        ptq_onnx.quantize_dynamic_onnx(fp32, out, fmt, op_types=cfg.op_types)
    fp32_session = onnx_session(fp32, None)
    check = check_int8_file(out, lambda x: onnx_run(fp32_session, x), data, cfg, fmt, ctx.path)
    ort_model = OrtModel(out)
    metrics = evaluate(ort_model, data, ctx.split, "cpu")
    facts.update({"artifact": str(out), "fp32_onnx": str(fp32), "fp32_onnx_bytes": fp32.stat().st_size,
                  "int8_onnx_bytes": out.stat().st_size, "size_ratio": round(fp32.stat().st_size / out.stat().st_size, 2),
                  "fp32_onnx_metrics": evaluate(OrtModel(fp32), data, ctx.split, "cpu"), "int8_check": check})
    return ort_model, metrics, facts


register_method(PTQStaticConfig, produces="onnx")(_ptq)
register_method(PTQDynamicConfig, produces="onnx")(_ptq)
