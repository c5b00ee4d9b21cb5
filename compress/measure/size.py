"""How big a model is: parameters and non-zeros, file size raw and zipped, bits per weight, MACs, per-layer sparsity."""
from __future__ import annotations

import contextlib
import io
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn


def stored_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Weights kept outside parameters: every submodule's ``stored_tensors()`` (packed low-bit codes of
    ``compress.quant.qat.QuantLayer``), a protocol so this module need not know how a layer stores them."""
    return [t for m in model.modules() if callable(getattr(m, "stored_tensors", None)) for t in m.stored_tensors()]


def _weights(model: nn.Module) -> list[torch.Tensor]:
    """Parameters and stored tensors, each shared tensor once: what the counts below count."""
    seen: dict[int, torch.Tensor] = {}
    for p in list(model.parameters()) + stored_tensors(model):
        seen.setdefault(id(p), p)
    return list(seen.values())


def count_params(model: nn.Module) -> tuple[int, int]:
    """(parameters, non-zero parameters), counting each shared tensor once; stored tensors count as parameters."""
    weights = _weights(model)
    return sum(p.numel() for p in weights), sum(int(torch.count_nonzero(p.detach())) for p in weights)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the counted parameters as their dtype stores them (4 per float32 weight), no file overhead."""
    return sum(p.numel() * p.element_size() for p in _weights(model))


def file_size(path: str | Path) -> int:
    return Path(path).stat().st_size


def saved_size(model: nn.Module) -> int:
    """Bytes of the model's checkpoint, for models that were never written to a run directory."""
    from compress.checkpoint import save_model

    with tempfile.TemporaryDirectory() as d:
        return file_size(save_model(model, Path(d) / "model.pt"))


def zipped_size(path: str | Path) -> int:
    """Bytes of ``path`` in a deflate zip (level 9): what pruned or clustered weights really cost to ship."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        z.write(path, Path(path).name)
    return buf.getbuffer().nbytes


def saved_zipped_size(model: nn.Module) -> int:
    from compress.checkpoint import save_model

    with tempfile.TemporaryDirectory() as d:
        return zipped_size(save_model(model, Path(d) / "model.pt"))


def bits_per_weight(nbytes: int, params: int) -> Optional[float]:
    """``nbytes`` in bits per parameter: of the weights' own bytes (``weight_bytes``), bits/weight (32 for
    float32, 8 for int8 codes); of a file's size, the file's bits/param (its overhead included)."""
    return round(8 * nbytes / params, 3) if params else None


# Inputs of quantized ONNX ops that are scales and zero points, not weights (ONNX and ORT's com.microsoft ops).
QPARAM_INPUTS = {"QuantizeLinear": (1, 2), "DequantizeLinear": (1, 2), "MatMulInteger": (2, 3), "ConvInteger": (2, 3),
                 "QLinearConv": (1, 2, 4, 5, 6, 7), "QLinearMatMul": (1, 2, 4, 5, 6, 7), "QGemm": (1, 2, 4, 5, 7, 8),
                 "QLinearAdd": (1, 2, 4, 5, 6, 7), "QLinearMul": (1, 2, 4, 5, 6, 7), "MatMulNBits": (2, 3)}


# Inputs that hold several low-bit weights per byte (ORT's weight-only ops; their ``bits`` attribute, default 4).
PACKED_INPUTS = {"MatMulNBits": 1, "GatherBlockQuantized": 0}


def onnx_weights(path: str | Path) -> tuple[int, int, int]:
    """(parameters, non-zeros, bytes as stored) of an ONNX file's weights: its initializers, less scalars and the
    scales and zero points of quantized ops (per-channel ones are vectors), so an int8 file counts what its float
    model counts; an int4 MatMulNBits weight counts two parameters per byte."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    qparams = {n.input[i] for n in graph.node for i in QPARAM_INPUTS.get(n.op_type, ()) if i < len(n.input)}
    per_byte = {n.input[PACKED_INPUTS[n.op_type]]: 8 // next((a.i for a in n.attribute if a.name == "bits"), 4)
                for n in graph.node if n.op_type in PACKED_INPUTS}
    total = nonzero = nbytes = 0
    for init in graph.initializer:
        arr = numpy_helper.to_array(init)
        if arr.ndim == 0 or arr.dtype.kind not in "fiu" or init.name in qparams:
            continue
        k = per_byte.get(init.name, 1)
        total += arr.size * k
        nonzero += arr.size * k if k > 1 else int(np.count_nonzero(arr))  # packed codes: zeros are not told apart
        nbytes += arr.nbytes
    return total, nonzero, nbytes


def count_macs(model: nn.Module, example: torch.Tensor, *, strict: bool = False) -> tuple[Optional[int], int]:
    """(multiply-accumulates, parameters) of one sample: torch-pruning's counter (conv/linear MACs plus
    elementwise ops). Dense count: zeros left by unstructured pruning are still counted, as a dense kernel runs them.

    A model the counter cannot trace gives ``(None, parameters)`` and a warning, so a report row still comes
    out; ``strict`` raises instead (pruning's budgets need the number). Decoder LMs are counted from their
    layout (``compress.pruning.decoder.decoder_macs``): the counter misses GPT-2's Conv1D projections and
    every model's attention score/value products, which grow with the sequence length.
    """
    import torch_pruning as tp

    from compress.models.decoder import decoder_layout, decoder_macs

    layout = decoder_layout(model)
    if layout is not None:
        ids = example["input_ids"] if isinstance(example, dict) else example
        return decoder_macs(model, layout, int(ids.shape[-1])), sum(p.numel() for p in model.parameters())

    was = model.training
    try:
        # redirect_stdout: the counter prints a warning per call for models called with keyword inputs only
        # (transformers behind IOModule); batch size 1 is what it assumes and what it gets here.
        with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
            macs, params = tp.utils.count_ops_and_params(model.eval(), example[:1].to(next(model.parameters()).device))
        return int(macs), int(params)
    except Exception as exc:  # custom modules the counter cannot trace: report no number rather than fail the run
        if strict:
            raise
        warnings.warn(f"MACs not counted: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        return None, sum(p.numel() for p in model.parameters())
    finally:
        model.train(was)


def layer_stats(model: nn.Module) -> list[dict]:
    """Per layer with a weight (2-D and up): its module path, type and weight shape, parameters and the share
    of zeros, for per-layer plots (the type and shape tell apart layers of a ``Sequential``, named '1', '3')."""
    out = []
    for name, m in model.named_modules():
        p = dict(m.named_parameters(recurse=False)).get("weight")  # its own weight, not its children's
        if p is not None and p.ndim >= 2:
            n = p.numel()
            out.append({"name": name or type(m).__name__, "type": type(m).__name__, "shape": list(p.shape),
                        "params": n, "sparsity": round(1 - int(torch.count_nonzero(p.detach())) / n, 4)})
    return out
