"""QAT inside a training loop you already have (torchao's pattern): ``prepare``, train as usual, ``convert``.

    model = qat.prepare(model, QuantizeConfig(method="qat", bits=8), calibration=train_loader)
    ...                                                  # your loop trains the fake-quantized model
    qat.convert(model, example_inputs=x, path="model_qat_int8.onnx")

The quantize stage's QAT does the same three things around its own trainer (``prepare_layers``,
``pack_layers``, ``export_qdq`` in compress/quant/methods), so the file is the one a recipe writes.
"""
from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any, Optional

import torch.nn as nn

from compress.errors import RecipeError

# model -> (config, wrapped layers, facts) between prepare and convert; weak: a dropped model takes its entry along
_PREPARED: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()
_FACTS: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def prepare(model: nn.Module, config=None, *, calibration=None, path: str = "quantize") -> nn.Module:
    """Fold BatchNorm and wrap the Conv/Linear layers of ``model`` (in place) in fake-quantized layers, as the
    quantize stage's QAT does before it trains; returns ``model``.

    ``config``: ``QuantizeConfig(method="qat", ...)`` (``finetune``, ``kd`` and ``export_onnx`` are the stage's
    own training and file options and are not used here). ``calibration``: batches (a loader of ``(x, y)``)
    whose first ``calibration_batches`` initialise the activation ranges; without it the first training batches
    do. Build your optimizer after ``prepare``: BatchNorm folding replaces layers (LSQ adds step sizes).
    """
    from compress.quant.methods import QuantizeConfig
    from compress.quant.methods.qat import QATConfig
    from compress.quant.methods.torch_side import prepare_layers

    cfg = config if config is not None else QuantizeConfig(method="qat")
    if not isinstance(cfg, QATConfig):
        raise RecipeError(f"{path}.method", f"prepare/convert are QAT's; got method '{cfg.method}'")
    cfg.check_rules(path)
    if model in _PREPARED:
        raise RuntimeError("the model is already prepared for QAT; convert it first")
    layers, facts = prepare_layers(model, cfg, cfg.layer_spec(path), path, calibration=calibration,
                                   calibrate_batches=cfg.calibration_batches)
    _PREPARED[model] = (cfg, layers, facts, path)
    return model


def convert(model: nn.Module, example_inputs: Any = None, path: Optional[str | Path] = None, *, data=None,
            traced: Optional[nn.Module] = None) -> nn.Module:
    """Pack the trained fake-quantized weights (k-bit codes; the model is then for inference), as the stage does
    after training; returns ``model``. With ``path`` (8-bit weights and activations) also write the QDQ ONNX
    file the stage writes, ``example_inputs`` being one batch the model takes; with ``data`` (a DataBundle) the
    file is checked against the PyTorch model as the stage checks it (``check:`` options). What the stage
    would report (sizes, layers, the file) is then ``facts(model)``. ``traced``: what to export instead of
    ``model`` itself, a wrapper that calls it (a transformers model's keyword inputs and ``logits``)."""
    from compress.quant.methods.base import check_int8_file
    from compress.quant.methods.torch_side import pack_layers
    from compress.quant.qat import export_qdq

    if model not in _PREPARED:
        raise RuntimeError("the model was not prepared with compress.quant.qat.prepare")
    cfg, layers, facts, where = _PREPARED.pop(model)
    facts = pack_layers(model, cfg, layers, facts)
    if path is not None:
        spec = cfg.layer_spec(where)
        if cfg.weight_bits != 8 or spec["act_bits"] != 8:
            raise RecipeError(f"{where}.bits", "an int8 ONNX file needs 8-bit weights and activations")
        if example_inputs is None:
            raise ValueError("writing the ONNX file traces the model: pass example_inputs (one batch it takes)")
        fmt = cfg.int8_format(where)
        out = export_qdq(traced if traced is not None else model, example_inputs, Path(path), cfg.opset, fmt.weight_type)
        facts.update(onnx=str(out), onnx_bytes=out.stat().st_size)
        if data is not None:
            import torch

            def reference(x):
                with torch.no_grad():
                    return model(x).cpu().numpy()

            facts["int8_check"] = check_int8_file(out, reference, data, cfg, fmt, where)
    _FACTS[model] = facts
    return model


def facts(model: nn.Module) -> dict:
    """The stage's facts for a converted model: weight bytes, compression, quantized layers, the ONNX file."""
    return dict(_FACTS.get(model, {}))
