"""The ``export`` stage: write the model as ONNX and prove ONNX Runtime computes what PyTorch computes.

    from compress import export, ExportConfig
    model, metrics = export(model, ExportConfig(opset=17), data, path="model.onnx")
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn as nn
from pydantic import Field

from compress.config import OutputPath, StrictModel
from compress.data.inputs import as_inputs
from compress.errors import CompressError
from compress.metrics import split_metrics
from compress.runtime.onnx import evaluate_onnx, onnx_run, onnx_session, to_onnx
from compress.stages.base import StageResult, register_stage


class ExportConfig(StrictModel):
    format: Literal["onnx"] = "onnx"
    opset: int = Field(17, ge=7, le=20)  # TorchScript exporter's range
    atol: float = Field(1e-4, ge=0)  # allowed |ORT - PyTorch| is atol + rtol * |PyTorch|
    rtol: float = Field(1e-3, ge=0)
    check_batches: int = Field(2, ge=1)  # real test batches compared (eval batch size)
    # Models with quantizers (QAT): ORT runs real int8 kernels where PyTorch simulates them, so outputs may
    # differ by an output quantization step or two; allowed extra: this fraction of the largest |output|.
    quantized_tolerance: float = Field(0.03, ge=0, lt=1)
    dynamic_batch: bool = True
    # Models with 8-bit quantizers: the CPU the int8 file must be right on (compress/quant/int8.py). any:
    # weights that could saturate the U8S8 kernels of CPUs without VNNI are stored as uint8 (exact, U8U8).
    target_cpu: Literal["any", "vnni", "native"] = "any"
    path: Optional[OutputPath] = None  # default: <stage dir>/model.onnx (recipe) or ./model.onnx (Python)


def check_parity(model: nn.Module, onnx_path: Path, data, cfg: ExportConfig, quantized: bool = False) -> dict:
    """Largest |ORT - PyTorch| over real batches; CompressError if any output is out of tolerance."""
    split = "test" if data.has("test") else "val"
    sess = onnx_session(onnx_path, max(1, torch.get_num_threads()))
    was = model.training
    model.eval().cpu()
    worst, worst_excess, samples = 0.0, -np.inf, 0
    try:
        for i, raw in enumerate(data.loader(split, shuffle=False)):
            if i >= cfg.check_batches:
                break
            x = as_inputs(raw[0])
            with torch.no_grad():
                ref = model(x).detach().cpu().numpy()
            got = onnx_run(sess, x)
            if got.shape != ref.shape:
                raise CompressError(f"ONNX Runtime returns outputs of shape {got.shape}, PyTorch {ref.shape}")
            diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
            diff = np.where(np.isnan(got) & np.isnan(ref), 0.0, np.nan_to_num(diff, nan=np.inf))
            worst = max(worst, float(diff.max(initial=0.0)))
            allowed = cfg.atol + cfg.rtol * np.abs(ref)
            if quantized:
                allowed = allowed + cfg.quantized_tolerance * float(np.abs(ref).max(initial=0.0))
            worst_excess = max(worst_excess, float((diff - allowed).max(initial=-np.inf)))
            samples += x.shape[0]
    finally:
        model.train(was)
    if samples == 0:
        raise CompressError(f"no {split} samples to compare ONNX Runtime against PyTorch")
    if worst_excess > 0:
        measured = (f"ONNX Runtime's outputs differ from PyTorch's by up to {worst:.3g} on {samples} real {split} "
                    f"samples (allowed: atol {cfg.atol} + rtol {cfg.rtol} x |output|")
        if not quantized:
            raise CompressError(f"{measured}): the exported graph does not compute what the model computes")
        raise CompressError(f"{measured} + {cfg.quantized_tolerance:.0%} of the output range): {_int8_cause(model, onnx_path, data, split, cfg.quantized_tolerance)}")
    return {"max_abs_diff": worst, "checked_samples": samples}


def _int8_cause(model: nn.Module, onnx_path: Path, data, split: str, tolerance: float) -> str:
    """Graph or kernel? ORT's float simulation of the same file tells (compress.quant.int8)."""
    from compress.quant.int8 import check_int8, kernel_cause

    def reference(x):
        with torch.no_grad():
            return model(x).cpu().numpy()

    c = check_int8(onnx_path, reference, data, split=split, batches=2)
    return kernel_cause(c, tolerance) or (
        f"the exported graph does not compute what the model computes (its float simulation is {c.sim_rel_diff:.1%} off too)")


def _portable(path: Path, target_cpu: str) -> Path:
    """Store int8 weights that could saturate U8S8 kernels as uint8 when the file must run on any CPU."""
    from compress.quant.int8 import saturation_risk, to_uint8_weights
    from compress.runtime.cpu import cpu_features

    needs = target_cpu == "any" or (target_cpu == "native" and cpu_features()["u8s8_saturates"])
    return to_uint8_weights(path) if needs and saturation_risk(path) else path


def export(model: nn.Module, config: ExportConfig | None = None, data=None, *, path: str | Path | None = None,
           where: str = "export"):
    """Write ``model`` as ONNX, check it against PyTorch on real batches, and measure it in ONNX Runtime.

    Returns ``Result(model, metrics)``: task metrics computed by ONNX Runtime, plus ``path``,
    ``max_abs_diff`` and ``checked_samples``. A file that fails the check is renamed ``*.rejected.onnx``.
    """
    from compress.api import Result, as_data

    cfg = config or ExportConfig()
    data = as_data(data)
    path = Path(path or cfg.path or "model.onnx")
    from compress.quant.qat import export_qdq, quant_layers

    quantized = bool(quant_layers(model))
    try:
        if quantized:  # constant weights, Q/DQ nodes for 8-bit layers, int8 codes in the file
            _portable(export_qdq(model, data.example_input(2), path, cfg.opset, dynamic_batch=cfg.dynamic_batch),
                      cfg.target_cpu)
        else:
            to_onnx(model.cpu(), data.example_input(2), path, cfg.opset, cfg.dynamic_batch)
        parity = check_parity(model, path, data, cfg, quantized)
    except CompressError as exc:
        if path.is_file():
            rejected = path.with_suffix(".rejected.onnx")
            path.replace(rejected)
            raise CompressError(f"{where}: {exc}; the file was not kept (see {rejected})") from None
        raise CompressError(f"{where}: {exc}") from None
    split = "test" if data.has("test") else "val"
    metrics = evaluate_onnx(path, data, split)
    return Result(model, {**metrics, **parity, "path": str(path), "opset": cfg.opset})


@register_stage("export", ExportConfig, "write the model as ONNX; ONNX Runtime must match PyTorch on real batches",
                accepts=("torch", "fakequant", "packed"))
def run_export(state, cfg: ExportConfig) -> StageResult:
    path = cfg.path or state.stage_dir / "model.onnx"
    _, m = export(state.model, cfg, state.data, path=path, where=state.stage.path)
    task, _ = split_metrics(m)
    return StageResult(state.model, artifact=Path(m["path"]), metrics=task,
                       facts={"format": "onnx", "opset": cfg.opset, "max_abs_diff": m["max_abs_diff"]})
