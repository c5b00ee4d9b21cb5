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


def count_params(model: nn.Module) -> tuple[int, int]:
    """(parameters, non-zero parameters), counting each shared tensor once; stored tensors count as parameters."""
    seen, total, nonzero = set(), 0, 0
    for p in list(model.parameters()) + stored_tensors(model):
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        nonzero += int(torch.count_nonzero(p.detach()))
    return total, nonzero


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


def bits_per_weight(size_bytes: int, params: int) -> Optional[float]:
    """Storage bits per parameter, file overhead included (32+ for float32, ~8 for int8 weights)."""
    return round(8 * size_bytes / params, 3) if params else None


def onnx_params(path: str | Path) -> tuple[int, int]:
    """(parameters, non-zeros) of an ONNX file: its initializers, less scalars (scales, zero points)."""
    import onnx
    from onnx import numpy_helper

    total = nonzero = 0
    for init in onnx.load(str(path)).graph.initializer:
        arr = numpy_helper.to_array(init)
        if arr.ndim == 0 or arr.dtype.kind not in "fiu":
            continue
        total += arr.size
        nonzero += int(np.count_nonzero(arr))
    return total, nonzero


def count_macs(model: nn.Module, example: torch.Tensor, *, strict: bool = False) -> tuple[Optional[int], int]:
    """(multiply-accumulates, parameters) of one sample: torch-pruning's counter (conv/linear MACs plus
    elementwise ops). Dense count: zeros left by unstructured pruning are still counted, as a dense kernel runs them.

    A model the counter cannot trace gives ``(None, parameters)`` and a warning, so a report row still comes
    out; ``strict`` raises instead (pruning's budgets need the number).
    """
    import torch_pruning as tp

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
    """Per weight tensor (2-D and up): parameters and the share of zeros, for per-layer plots."""
    out = []
    for name, p in model.named_parameters():
        if p.ndim >= 2 and name.endswith("weight"):
            n = p.numel()
            out.append({"name": name.removesuffix(".weight"), "params": n,
                        "sparsity": round(1 - int(torch.count_nonzero(p.detach())) / n, 4)})
    return out
