"""The ``quantize`` stage and its verb: one config class per method (``compress.quant.methods``),
dispatched by type: int8 PTQ in ONNX Runtime, weight-only k-bit, QAT (8/4/2 bits), binary nets.

    from compress import quantize, QuantizeConfig
    model, metrics = quantize(model, QuantizeConfig(method="qat", bits=4), data)
"""
from __future__ import annotations

import shutil
import tempfile
import weakref
from pathlib import Path

import torch.nn as nn

from compress.api import Result, as_data
from compress.errors import RecipeError
from compress.metrics import split_metrics
from compress.quant.methods import QUANT_METHODS, QuantContext, QuantizeConfig, handler_for
from compress.stages.base import StageResult, register_stage

__all__ = ["QuantizeConfig", "quantize", "check_config"]


def check_config(cfg: QuantizeConfig, path: str) -> None:
    """Cross-key rules of the method, shared by the recipe check and the Python entry point."""
    cfg.check_rules(path)


def _check(recipe, index: int, cfg: QuantizeConfig) -> None:
    path = f"stages[{index}].quantize"
    check_config(cfg, path)
    if getattr(cfg, "kd", None) is not None and recipe.teacher is None:
        raise RecipeError(f"{path}.kd", "needs a teacher: the recipe has no 'teacher:' section")


def quantize(model: nn.Module, config: QuantizeConfig | None = None, data=None, teacher: nn.Module | None = None,
             *, out_dir: str | Path | None = None, split: str | None = None, trainer_kwargs: dict | None = None,
             path: str = "quantize") -> Result:
    """Quantize ``model`` with the handler registered for ``type(config)`` (``path``: the key path errors name).

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
    ctx = QuantContext(data, out, split, path, teacher, trainer_kwargs or {"name": "quantize"})
    try:
        result, metrics, facts = handler_for(config)(model, config, ctx)
    except BaseException:
        if out_dir is None:
            shutil.rmtree(out, ignore_errors=True)
        raise
    if out_dir is None:
        # No folder given: the files live as long as the returned model (or the process), then go.
        weakref.finalize(result, shutil.rmtree, str(out), True)
    return Result(result, {**metrics, **facts})


def _produces(cfg: QuantizeConfig, kind: str) -> str:
    return QUANT_METHODS.get(cfg.method).extra["produces"]


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
    if _produces(cfg, "torch") == "onnx":  # the ONNX file ships; the PyTorch model is handed on unchanged
        return StageResult(state.model, artifact=Path(metrics["artifact"]), metrics=task, facts=facts)
    return StageResult(model, metrics=task, facts=facts)
