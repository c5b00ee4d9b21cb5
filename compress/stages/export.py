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
from compress.errors import CompressError
from compress.measure import evaluate_onnx, onnx_run, onnx_session, to_onnx
from compress.recipe import register_stage


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
            x = raw[0]
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
        raise CompressError(f"ONNX Runtime's outputs differ from PyTorch's by up to {worst:.3g} on {samples} real {split} "
                            f"samples (allowed: atol {cfg.atol} + rtol {cfg.rtol} x |output|): the exported graph "
                            "does not compute what the model computes")
    return {"max_abs_diff": worst, "checked_samples": samples}


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
    from compress.quant.qat import exporting, quant_layers

    quantized = bool(quant_layers(model))
    try:
        with exporting(model):  # quantized layers: constant weights, Q/DQ nodes for 8-bit ones
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
def run_export(state, cfg: ExportConfig):
    path = cfg.path or state.stage_dir / "model.onnx"
    _, m = export(state.model, cfg, state.data, path=path, where=state.stage.path)
    state.artifact = Path(m["path"])
    state.stage_metrics = {k: m[k] for k in ("accuracy", "top5", "rmse", "mae", "loss") if k in m}
    state.extra.update(format="onnx", opset=cfg.opset, max_abs_diff=m["max_abs_diff"])
    return state
