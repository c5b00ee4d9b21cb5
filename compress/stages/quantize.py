"""The ``quantize`` stage: int8 PTQ in ONNX Runtime, weight-only k-bit, QAT (8/4/2 bits), binary nets.

    from compress import quantize, QuantizeConfig
    model, metrics = quantize(model, QuantizeConfig(method="qat", bits=4), data)
"""
from __future__ import annotations

import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Literal, Optional, Union

import torch
import torch.nn as nn
from pydantic import Field, field_validator

from compress.api import Result, as_data
from compress.checkpoint import record_transform
from compress.config import StrictModel
from compress.errors import CompressError, RecipeError
from compress.metrics import split_metrics
from compress.runtime.onnx import OrtModel, onnx_run, onnx_session
from compress.quant import int8, ptq_onnx
from compress.quant.qat import (ClipLatentWeights, calibrate, export_qdq, fold_batchnorm, pack_model,
                                quant_layers, quantizable_names, wrap)
from compress.kd import KDConfig, kd_hook
from compress.stages.base import StageResult, register_stage
from compress.trainer import OptimizerConfig, TrainConfig, Trainer, evaluate

class CalibrationConfig(StrictModel):
    method: Literal["minmax", "entropy", "percentile"] = "minmax"
    batches: int = Field(8, ge=1)  # batches of the training split fed to ONNX Runtime's calibrator
    batch_size: Optional[int] = Field(None, ge=1)
    percentile: float = Field(99.999, gt=0, le=100)


class Int8CheckConfig(StrictModel):
    """int8 file vs its float reference on the validation split, on the machine that makes it."""

    batches: int = Field(4, ge=1)
    max_rel_diff: float = Field(0.25, gt=0)  # largest |int8 - float| as a share of the largest |float output|
    # classification: predicted classes that agree (an untrained model's near-tied logits flip more often)
    min_top1_agreement: float = Field(0.9, ge=0, le=1)
    # int8 kernels vs ORT's float simulation of the same file: requantization rounding only
    max_kernel_diff: float = Field(0.05, gt=0)


class QuantizeKDConfig(KDConfig):
    """Knowledge distillation while fine-tuning, through the distill stage's own hook."""

    alpha: float = Field(0.1, ge=0, le=1)  # weight of the hard-label loss, as in the distill stage


class QuantizeConfig(StrictModel):
    method: Literal["ptq_static", "ptq_dynamic", "weight_only", "qat", "binary"] = "ptq_static"
    bits: Optional[int] = None  # weights: 8 (default), 4 or 2; binary is 1, ONNX PTQ is 8
    activation_bits: Optional[int] = None  # qat: default = bits; 0 keeps float activations
    per_channel: bool = True  # ONNX PTQ weights (QAT/weight-only/binary scales are always per channel)
    # ONNX PTQ: quantize only these ONNX op types (ORT's op_types_to_quantize), e.g. [Gemm, MatMul]: on
    # tiny convolutions ORT's int8 kernels are slower than fp32, while the weights sit in the dense layers.
    op_types: Optional[list[str]] = None
    # ONNX PTQ
    calibration: CalibrationConfig = CalibrationConfig()
    activation_type: Literal["uint8", "int8"] = "uint8"
    # int8 files (PTQ, 8-bit QAT): the CPU they must be right on. any: every x86 CPU (7-bit weights keep
    # ORT's fast U8S8 kernels from saturating where there is no VNNI); vnni: full 8-bit weights, only for
    # CPUs with VNNI/AMX; native: what this machine needs. See compress/quant/int8.py.
    target_cpu: Literal["any", "vnni", "native"] = "any"
    weight_type: Literal["auto", "int8", "uint8"] = "auto"  # uint8: U8U8 kernels (never saturate, slower)
    reduce_range: Union[bool, Literal["auto"]] = "auto"  # 7-bit int8 weights (ORT's reduce_range)
    check: Int8CheckConfig = Int8CheckConfig()
    preprocess: bool = True  # onnxruntime's quant_pre_process before static quantization
    # False keeps biases float in the file: ORT still fuses QLinearConv/QGemm (it quantizes them at
    # load) and the file drops each layer's int32 bias, bias scale and bias zero point.
    quantize_bias: bool = False
    opset: int = Field(17, ge=13)
    # QAT / weight-only / binary
    observer: Literal["ema", "lsq"] = "ema"  # activation (and, for lsq, weight) ranges
    ema_momentum: float = Field(0.01, gt=0, le=1)
    fold_bn: bool = True
    binary: Literal["binaryconnect", "xnor"] = "binaryconnect"
    binary_scale: Literal["none", "layer", "channel"] = "channel"  # XNOR-Net uses per-channel mean|w|
    keep_first_last: Optional[bool] = None  # default: true for binary, false otherwise
    exclude: list[str] = []  # layer names left in float
    rounds: int = Field(1, ge=1)  # weight_only: round, then fine-tune, this many times
    calibration_batches: int = Field(8, ge=1)  # qat: batches that initialise activation ranges
    finetune: Optional[TrainConfig] = None  # default: 3 epochs (Adam 5e-4, cosine) for qat/binary, none for weight_only
    kd: Optional[QuantizeKDConfig] = None  # qat/binary: distil from the recipe's teacher while fine-tuning
    export_onnx: bool = True  # 8-bit qat: also write a QDQ .onnx and measure it in ONNX Runtime

    @field_validator("bits")
    @classmethod
    def _bits(cls, v):
        if v is not None and v not in (1, 2, 4, 8):
            raise ValueError(f"expected one of 1, 2, 4, 8, got {v!r}")
        return v

    @field_validator("activation_bits")
    @classmethod
    def _act_bits(cls, v):
        if v is not None and v not in (0, 2, 4, 8):
            raise ValueError(f"expected one of 0 (float), 2, 4, 8, got {v!r}")
        return v

    def finetune_config(self) -> TrainConfig:
        if self.finetune is not None:
            return self.finetune
        epochs = 0 if self.method == "weight_only" else 3
        return TrainConfig(epochs=epochs, optimizer=OptimizerConfig(lr=5e-4), scheduler={"name": "cosine"})

    @property
    def weight_bits(self) -> int:
        return self.bits if self.bits is not None else (1 if self.method == "binary" else 8)


def check_config(cfg: QuantizeConfig, path: str) -> None:
    """Cross-key rules, shared by the recipe check and the Python entry point."""
    bits = cfg.weight_bits
    if cfg.method in ("ptq_static", "ptq_dynamic") and bits != 8:
        raise RecipeError(f"{path}.bits", f"{cfg.method} quantizes to int8 in ONNX Runtime; expected 8, got {bits}")
    if cfg.method in ("ptq_static", "ptq_dynamic") or (cfg.method == "qat" and bits == 8):
        int8_format(cfg, path)
    if cfg.method == "binary" and bits != 1:
        raise RecipeError(f"{path}.bits", f"binary networks have 1-bit weights; expected 1, got {bits}")
    if cfg.method in ("weight_only", "qat") and bits == 1:
        raise RecipeError(f"{path}.bits", f"1-bit weights are method 'binary'; {cfg.method} takes 8, 4 or 2")


def int8_format(cfg: QuantizeConfig, path: str = "quantize") -> int8.Int8Format:
    return int8.resolve_format(cfg.weight_type, cfg.reduce_range, cfg.target_cpu, cfg.activation_type,
                               cfg.per_channel, path)


def check_int8_file(path: Path, reference, data, cfg: QuantizeConfig, fmt: int8.Int8Format, where: str) -> dict:
    """Check an int8 file against its float reference on validation inputs; a failing file is set aside."""
    split = "val" if data.has("val") else "test"
    result = int8.check_int8(path, reference, data, split=split, batches=cfg.check.batches)
    problem = int8.verdict(result, max_rel_diff=cfg.check.max_rel_diff, min_top1_agreement=cfg.check.min_top1_agreement,
                           max_kernel_diff=cfg.check.max_kernel_diff)
    if problem:
        rejected = path.with_suffix(".rejected.onnx")
        path.replace(rejected)
        raise CompressError(f"{where}: {problem}; the file was not kept (see {rejected})")
    return {**result.as_dict(), "format": fmt.words(), "target_cpu": cfg.target_cpu}


def _check(recipe, index: int, cfg: QuantizeConfig) -> None:
    path = f"stages[{index}].quantize"
    check_config(cfg, path)
    if cfg.kd is not None and recipe.teacher is None:
        raise RecipeError(f"{path}.kd", "needs a teacher: the recipe has no 'teacher:' section")


def _sizes(model: nn.Module) -> dict:
    """Bytes of the weights of the quantized layers as stored, against the same weights in fp32."""
    stored = fp32 = 0
    for m in quant_layers(model):
        n = 1
        for d in m.weight_shape:
            n *= d
        fp32 += 4 * n
        stored += m.weight_packed.numel() + 4 * m.weight_scale.numel() if m.packed else 4 * n
    for name, p in model.named_parameters():  # layers left in float (first/last, excluded)
        if name.endswith("weight") and p.ndim > 1:
            fp32 += 4 * p.numel()
            stored += 4 * p.numel()
    return {"weight_bytes": stored, "fp32_weight_bytes": fp32, "weight_compression": round(fp32 / max(stored, 1), 2)}


def _ptq(model, cfg: QuantizeConfig, data, out_dir: Path, split: str, path: str):
    example = data.example_input(1)
    fp32 = ptq_onnx.export_onnx(model.cpu(), example, out_dir / "model_fp32.onnx", cfg.opset)
    out = out_dir / "model_int8.onnx"
    fmt = int8_format(cfg, path)
    if cfg.method == "ptq_static":
        bs = cfg.calibration.batch_size or data.batch_size
        loader = data.loader("train", shuffle=False, batch_size=bs)
        ptq_onnx.quantize_static_onnx(fp32, out, loader, fmt, batches=cfg.calibration.batches,
                                      method=cfg.calibration.method, percentile=cfg.calibration.percentile,
                                      preprocess=cfg.preprocess, quantize_bias=cfg.quantize_bias,
                                      op_types=cfg.op_types)
    else:
        ptq_onnx.quantize_dynamic_onnx(fp32, out, fmt, op_types=cfg.op_types)
    fp32_session = onnx_session(fp32, None)
    check = check_int8_file(out, lambda x: onnx_run(fp32_session, x), data, cfg, fmt, path)
    ort_model = OrtModel(out)
    metrics = evaluate(ort_model, data, split, "cpu")
    fp32_metrics = evaluate(OrtModel(fp32), data, split, "cpu")
    extra = {"method": cfg.method, "bits": 8, "artifact": str(out), "fp32_onnx": str(fp32),
             "fp32_onnx_bytes": fp32.stat().st_size, "int8_onnx_bytes": out.stat().st_size,
             "size_ratio": round(fp32.stat().st_size / out.stat().st_size, 2),
             "fp32_onnx_metrics": fp32_metrics, "int8_check": check}
    if cfg.method == "ptq_static":
        extra["calibration"] = cfg.calibration.method
    return ort_model, metrics, extra


def _layer_spec(cfg: QuantizeConfig, path: str = "quantize") -> dict:
    if cfg.method == "binary":
        return {"kind": "binary", "bits": 1, "binary": cfg.binary, "scale_mode": cfg.binary_scale}
    bits = cfg.weight_bits
    act_bits = 0 if cfg.method == "weight_only" else (bits if cfg.activation_bits is None else cfg.activation_bits)
    spec = {"kind": "int", "bits": bits, "act_bits": act_bits, "act_mode": cfg.observer,
            "momentum": cfg.ema_momentum, "learned_scale": cfg.observer == "lsq" and cfg.method == "qat",
            "out_quant": act_bits == 8}  # int8 outputs let ONNX Runtime fuse Q/DQ into int8 kernels
    if cfg.method == "qat" and bits == 8 and int8_format(cfg, path).reduce_range:
        spec["range_bits"] = 7  # train on the 7-bit grid the portable int8 file holds, so both compute alike
    return spec


def _torch_side(model, cfg: QuantizeConfig, data, teacher, trainer_kwargs: dict, out_dir: Optional[Path], split: str,
                path: str = "quantize"):
    bits = cfg.weight_bits
    extra: dict = {"method": cfg.method, "bits": bits}
    finetune = cfg.finetune_config()
    if cfg.fold_bn:
        pairs = fold_batchnorm(model)
        if pairs:
            record_transform(model, "fold_bn", pairs=pairs)
            extra["folded_bn"] = len(pairs)
    keep = cfg.keep_first_last if cfg.keep_first_last is not None else cfg.method == "binary"
    names = quantizable_names(model, keep, cfg.exclude)
    missing = [n for n in cfg.exclude if n not in dict(model.named_modules())]
    if missing:
        raise RecipeError(f"{path}.exclude", f"no layer named {missing[0]!r} in the model")
    if not names:
        raise RecipeError(path, "the model has no Conv/Linear layer left to quantize")
    spec = _layer_spec(cfg, path)
    layers = {n: spec for n in names}
    wrap(model, layers)
    if cfg.method == "binary":
        extra["binary"] = cfg.binary
    if spec.get("act_bits"):
        extra["activation_bits"] = spec["act_bits"]
        calibrate(model, data.loader("train", shuffle=True, batch_size=finetune.batch_size),
                  cfg.calibration_batches)
    hooks = []
    if cfg.method == "binary":
        hooks.append(ClipLatentWeights(model))
    if cfg.kd is not None:
        if teacher is None:
            raise RecipeError(f"{path}.kd", "needs a teacher model (pass teacher=... or add 'teacher:' to the recipe)")
        hooks.append(kd_hook(model, teacher, cfg.kd, data, path=f"{path}.kd", teacher_path=f"{path}.kd",
                             device=finetune.device))
    rounds = cfg.rounds if cfg.method == "weight_only" else 1
    try:
        for r in range(rounds):
            if cfg.method == "weight_only":
                for m in quant_layers(model):
                    m.round_weight()
            if finetune.epochs > 0:
                kw = dict(trainer_kwargs)
                if rounds > 1 and kw.get("state_path") is not None:
                    kw["state_path"] = Path(kw["state_path"]).with_name(f"trainer_state_round{r}.pt")
                Trainer(model, finetune, data, hooks, **kw).fit()
    finally:
        for h in hooks:
            if hasattr(h, "close"):
                h.close()
    model.eval()
    pack_model(model)
    record_transform(model, cfg.method, layers=layers, bits=bits)
    extra.update(_sizes(model))
    extra["quantized_layers"] = len(names)
    metrics = evaluate(model, data, split)
    if cfg.method == "qat" and bits == 8 and spec["act_bits"] == 8 and cfg.export_onnx and out_dir is not None:
        fmt = int8_format(cfg, path)
        onnx_path = export_qdq(model, data.example_input(1), out_dir / "model_qat_int8.onnx", cfg.opset, fmt.weight_type)

        def reference(x):
            with torch.no_grad():
                return model(x).cpu().numpy()

        check = check_int8_file(onnx_path, reference, data, cfg, fmt, path)
        ort_metrics = evaluate(OrtModel(onnx_path), data, split, "cpu")
        extra.update(onnx=str(onnx_path), onnx_bytes=onnx_path.stat().st_size, onnx_metrics=ort_metrics, int8_check=check)
    return model, metrics, extra


def quantize(model: nn.Module, config: QuantizeConfig | None = None, data=None, teacher: nn.Module | None = None,
             *, out_dir: str | Path | None = None, split: str | None = None, trainer_kwargs: dict | None = None,
             path: str = "quantize") -> Result:
    """Quantize ``model`` with ``config.method`` (``path``: the recipe key path errors name).

    ONNX PTQ leaves ``model`` untouched and returns an ``OrtModel`` running the int8 .onnx (path in
    ``metrics['artifact']``); the other methods change ``model`` in place (packed weights) and return it.
    Without ``out_dir`` the files go to a temporary folder removed with the returned model: pass
    ``out_dir`` to keep them.
    """
    config = config or QuantizeConfig()
    check_config(config, path)
    data = as_data(data)
    split = split or ("test" if data.has("test") else "val")
    out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="compress-quantize-"))
    out.mkdir(parents=True, exist_ok=True)
    try:
        if config.method in ("ptq_static", "ptq_dynamic"):
            result, metrics, extra = _ptq(model, config, data, out, split, path)
        else:
            result, metrics, extra = _torch_side(model, config, data, teacher, trainer_kwargs or {"name": "quantize"},
                                                 out, split, path)
    except BaseException:
        if out_dir is None:
            shutil.rmtree(out, ignore_errors=True)
        raise
    if out_dir is None:
        # No folder given: the files live as long as the returned model (or the process), then go.
        weakref.finalize(result, shutil.rmtree, str(out), True)
    return Result(result, {**metrics, **extra})


def _produces(cfg: QuantizeConfig, kind: str) -> str:
    return {"ptq_static": "onnx", "ptq_dynamic": "onnx", "qat": "fakequant"}.get(cfg.method, "packed")


@register_stage("quantize", QuantizeConfig, "int8 PTQ in ONNX Runtime, weight-only k-bit, QAT (8/4/2 bits), binary nets",
                check=_check, accepts=("torch",), produces=_produces,
                trains=lambda c: c.method in ("qat", "binary", "weight_only") and c.finetune_config().epochs > 0)
def run_quantize(state, cfg: QuantizeConfig) -> StageResult:
    split = state.recipe.benchmark.split if state.recipe and state.recipe.benchmark else "test"
    split = split if state.data.has(split) else "val"
    kw = state.trainer_kwargs("quantize")
    model, metrics = quantize(state.model, cfg, state.data, state.teacher, out_dir=state.stage_dir, split=split,
                              trainer_kwargs=kw, path=state.stage.path)
    task, facts = split_metrics(metrics)
    if cfg.method in ("ptq_static", "ptq_dynamic"):  # the ONNX file ships; the PyTorch model is handed on unchanged
        return StageResult(state.model, artifact=Path(metrics["artifact"]), metrics=task, facts=facts)
    return StageResult(model, metrics=task, facts=facts)
