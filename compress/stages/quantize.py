"""The ``quantize`` stage and its verb: one config class per method (``compress.quant.methods``),
dispatched by type: int8 PTQ in ONNX Runtime, weight-only k-bit, QAT (8/4/2 bits), binary nets.

    from compress import quantize, QuantizeConfig
    model, metrics = quantize(model, QuantizeConfig(method="qat", bits=4), data)
    int8, metrics = quantize("model.onnx", data="calibration.npz")   # a float .onnx file you already have
"""
from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from pathlib import Path

import torch.nn as nn

from compress.api import Result, as_data
from compress.errors import RecipeError
from compress.metrics import split_metrics
from compress.quant.methods import QUANT_METHODS, QuantContext, QuantizeConfig, handler_for
from compress.quant.methods.base import file_handler_for
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


def quantize(model: nn.Module | str | Path, config: QuantizeConfig | None = None, data=None,
             teacher: nn.Module | None = None, *, out_dir: str | Path | None = None, split: str | None = None,
             trainer_kwargs: dict | None = None, path: str = "quantize", out: str | Path | None = None,
             benchmark=None) -> Result:
    """Quantize ``model`` with the handler registered for ``type(config)`` (``path``: the key path errors name).

    ONNX PTQ leaves ``model`` untouched and returns an ``OrtModel`` running the int8 .onnx (path in
    ``metrics['artifact']``); the other methods change ``model`` in place (packed weights) and return it.
    Without ``out_dir`` the files go to a temporary folder removed with the returned model: pass
    ``out_dir`` to keep them.

    ``model`` may be the path of a float ``.onnx`` file (``ptq_static``/``ptq_dynamic``): ``data`` is then
    a DataBundle, a dataset name, a data block (dict, as a recipe's ``data:``) or an ``.npz`` of inputs; the
    int8 file goes to ``out`` (default: ``<out_dir>/<stem>_int8.onnx``) and the metrics add its agreement
    with the file and, unless ``benchmark`` (a BenchmarkConfig) says ``latency: false``, both latencies. A
    language model's file with a cache takes ``nbits``/``lm_dynamic`` (data: also split -> token blocks, or an
    ``.npz`` of them) and is checked by perplexity.
    """
    config = config or QuantizeConfig()
    check_config(config, path)
    is_file = isinstance(model, (str, os.PathLike))
    handler = file_handler_for(config, path) if is_file else handler_for(config)
    if not is_file:  # a file's handler reads the data itself: an .npz of inputs is no DataBundle
        data = as_data(data)
        split = split or ("test" if data.has("test") else "val")
    out_dir_given = out_dir is not None
    out_dir = Path(out_dir) if out_dir_given else Path(tempfile.mkdtemp(prefix="compress-quantize-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = QuantContext(data, out_dir, split or "val", path, teacher, trainer_kwargs or {"name": "quantize"},
                       artifact=Path(out) if out is not None else None, benchmark=benchmark)
    try:
        result, metrics, facts = handler(model, config, ctx)
    except BaseException:
        if not out_dir_given:
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    if not out_dir_given:
        # No folder given: the files live as long as the returned model (or the process), then go.
        weakref.finalize(result, shutil.rmtree, str(out_dir), True)
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
