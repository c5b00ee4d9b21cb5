"""Quantization-aware training (8/4/2-bit weights, per-channel; activations per tensor, EMA or LSQ ranges).

8-bit models are also written as a QDQ ``.onnx`` that ONNX Runtime runs with int8 kernels, checked
against the PyTorch model on validation inputs.
"""
from __future__ import annotations

from typing import Literal, Optional

import torch
from pydantic import Field, field_validator

from compress.evaluation import evaluate
from compress.quant.methods.base import Int8FileOptions, QuantContext, check_int8_file, register_method
from compress.quant.methods.torch_side import QuantizeKDConfig, TorchSideOptions, quantize_layers
from compress.quant.qat import export_qdq
from compress.runtime.onnx import OrtModel


class QATConfig(TorchSideOptions, Int8FileOptions):
    """Fake-quantized fine-tuning (STE), BN folded, optional KD from the recipe's teacher."""

    method: Literal["qat"] = "qat"
    activation_bits: Optional[int] = None  # default = bits; 0 keeps float activations
    observer: Literal["ema", "lsq"] = "ema"  # activation (and, for lsq, weight) ranges
    ema_momentum: float = Field(0.01, gt=0, le=1)
    calibration_batches: int = Field(8, ge=1)  # batches that initialise activation ranges
    kd: Optional[QuantizeKDConfig] = None  # distil from the recipe's teacher while fine-tuning
    export_onnx: bool = True  # 8-bit: also write a QDQ .onnx and measure it in ONNX Runtime

    @field_validator("activation_bits")
    @classmethod
    def _act_bits(cls, v):
        if v is not None and v not in (0, 2, 4, 8):
            raise ValueError(f"expected one of 0 (float), 2, 4, 8, got {v!r}")
        return v

    def check_rules(self, path: str) -> None:
        TorchSideOptions.check_rules(self, path)
        if self.weight_bits == 8:
            self.int8_format(path)

    def layer_spec(self, path: str) -> dict:
        bits = self.weight_bits
        act_bits = bits if self.activation_bits is None else self.activation_bits
        spec = {"kind": "int", "bits": bits, "act_bits": act_bits, "act_mode": self.observer,
                "momentum": self.ema_momentum, "learned_scale": self.observer == "lsq",
                "out_quant": act_bits == 8}  # int8 outputs let ONNX Runtime fuse Q/DQ into int8 kernels
        if bits == 8 and self.int8_format(path).reduce_range:
            spec["range_bits"] = 7  # train on the 7-bit grid the portable int8 file holds, so both compute alike
        return spec


@register_method(QATConfig, produces="fakequant")
def quantize_qat(model, cfg: QATConfig, ctx: QuantContext):
    spec = cfg.layer_spec(ctx.path)
    model, metrics, facts = quantize_layers(model, cfg, ctx, spec, kd=cfg.kd, calibrate_batches=cfg.calibration_batches)
    if cfg.weight_bits == 8 and spec["act_bits"] == 8 and cfg.export_onnx:
        fmt = cfg.int8_format(ctx.path)
        path = export_qdq(model, ctx.data.example_input(1), ctx.out_dir / "model_qat_int8.onnx", cfg.opset, fmt.weight_type)

        def reference(x):
            with torch.no_grad():
                return model(x).cpu().numpy()

        check = check_int8_file(path, reference, ctx.data, cfg, fmt, ctx.path)
        facts.update(onnx=str(path), onnx_bytes=path.stat().st_size, int8_check=check,
                     onnx_metrics=evaluate(OrtModel(path), ctx.data, ctx.split, "cpu"))
    return model, metrics, facts
