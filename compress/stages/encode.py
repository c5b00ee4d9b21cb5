"""The ``encode`` stage and ``compress.encode(...)``: write the model as a packed file (``compress.packfile``:
sparse indices, codebook indices, entropy coding), read it back and check it is bit-exact.

The packed file is the stage's artifact (the report's size for this row); the model handed on is the one
read back from it, so whatever follows (an ONNX export for ONNX Runtime, say) starts from exactly what
was packed.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

from compress.api import Result
from compress.config import StrictModel
from compress.errors import CompressError
from compress.measure.size import saved_size
from compress.packfile import UNPACK_FLOOR, pack_model
from compress.stages.base import StageResult, register_stage
from compress.utils import atomic_path

__all__ = ["EncodeConfig", "encode", "encode_onnx", "same_weights"]


class EncodeConfig(StrictModel):
    """No options yet: every tensor gets the smallest encoding and coder found for it."""


def same_weights(a: nn.Module, b: nn.Module) -> list[str]:
    """Names of the state_dict entries whose bytes differ (or are missing) between ``a`` and ``b``."""
    sa, sb = a.state_dict(), b.state_dict()
    bad = [k for k in sa.keys() | sb.keys() if k not in sa or k not in sb]

    def raw(t: torch.Tensor) -> torch.Tensor:
        return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)

    bad += [k for k in sa.keys() & sb.keys()
            if sa[k].dtype != sb[k].dtype or sa[k].shape != sb[k].shape or not torch.equal(raw(sa[k]), raw(sb[k]))]
    return sorted(bad)


@torch.no_grad()
def clear_negative_zeros(model: nn.Module) -> int:
    """Turn -0.0 into +0.0 in every floating tensor, in place; returns how many there were.

    Pruning masks are multiplied in, so a pruned negative weight is -0.0: the same number, but a different
    bit pattern that a sparse index would otherwise have to spend a sign bit on.
    """
    n = 0
    for t in model.state_dict().values():
        if t.is_floating_point():
            neg = (t == 0) & torch.signbit(t)
            if neg.any():
                n += int(neg.sum())
                t.masked_fill_(neg, 0.0)
    return n


def encode(model: nn.Module, config: EncodeConfig | None = None, data=None, *, out: str | Path | None = None) -> Result:
    """Pack ``model`` to ``out`` (default: a temporary file), reload it, check every tensor bit-exact.

    ``model``'s -0.0 weights become +0.0 first (``clear_negative_zeros``); nothing else changes.
    Returns the reloaded model and facts: packed and raw (.pt) bytes, bits per weight of the weight
    tensors overall and per non-zero, and how many streams each entropy coder won.
    """
    from compress.checkpoint import load_model

    path = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="compress-encode-")) / "model.cpk"
    cleared = clear_negative_zeros(model)
    with atomic_path(path) as tmp:  # kept only once it reads back exactly
        info = pack_model(model, tmp)
        # our own file, of the model in hand: its limit is that model's size, not the file's (a pruned and
        # clustered model may pack more than 256x smaller)
        held = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        back = load_model(tmp, max_bytes=UNPACK_FLOOR + 4 * held)
        bad = same_weights(model, back)
        if bad:
            raise CompressError(f"{path}: packed model does not read back exactly ({', '.join(bad[:3])})")
    (path.parent / f"{path.stem}.layers.json").write_text(json.dumps(info["tensors"], indent=1))
    facts = {"packed_file": str(path), "packed_bytes": info["bytes"], "raw_bytes": saved_size(model),
             "weight_bits_per_weight": info["weight_bits_per_weight"],
             "weight_bits_per_nonzero": info["weight_bits_per_nonzero"], "coders": info["coders"], "negative_zeros_cleared": cleared}
    return Result(back.eval(), facts)


def encode_onnx(src: str | Path, config: EncodeConfig | None = None, *, out: str | Path) -> Result:
    """Pack the ONNX model ``src`` (an int8 PTQ file, say) to ``out``, read it back and check that the model
    serializes to the same bytes; returns ``OrtModel`` of what was read back and facts as ``encode``'s."""
    import onnx

    from compress.checkpoint import load_model
    from compress.packfile import pack_onnx

    src, out = Path(src), Path(out)
    with atomic_path(out) as tmp:  # kept only once it reads back exactly
        info = pack_onnx(src, tmp)
        back = load_model(tmp, max_bytes=UNPACK_FLOOR + 4 * src.stat().st_size)
        if back.model_bytes != onnx.load_model(str(src)).SerializeToString():
            raise CompressError(f"{out}: packed ONNX model does not read back exactly")
    (out.parent / f"{out.stem}.layers.json").write_text(json.dumps(info["tensors"], indent=1))
    facts = {"packed_file": str(out), "packed_bytes": info["bytes"], "raw_bytes": src.stat().st_size,
             "weight_bits_per_weight": info["weight_bits_per_weight"],
             "weight_bits_per_nonzero": info["weight_bits_per_nonzero"], "coders": info["coders"]}
    return Result(back, facts)


def packed_size(model: nn.Module) -> int:
    """Bytes ``model`` would take as a packed file (nothing written; ``model`` is left as it is)."""
    import copy

    from compress.checkpoint_io import model_state
    from compress.packfile import pack_state

    model = copy.deepcopy(model)
    clear_negative_zeros(model)
    return len(pack_state(model_state(model))[0])


def earlier_packed_sizes(results: list[dict], last: int | None = None) -> dict[str, int]:
    """Stage index -> packed size of the model each earlier stage saved (``.pt``): the report's waterfall
    then shows what each step (pruning: sparse indices; clustering: codebooks) did to the packed file,
    where the ``.pt`` files of a pruned and a clustered model are as large as the dense one's.
    ``last``: the size for the last row's model when already known (the model encode just packed), not
    loaded and packed again."""
    from compress.checkpoint import load_model

    out = {}
    for j, r in enumerate(results):
        f = r.get("model_file")
        if last is not None and j == len(results) - 1:
            out[str(r["index"])] = last
        elif f and f.endswith(".pt") and Path(f).is_file():
            try:
                out[str(r["index"])] = packed_size(load_model(f))
            except CompressError:  # a model the packed format cannot hold: no bar for it
                continue
    return out


def _onnx_input(state) -> Path | None:
    """The ONNX file this stage gets when an earlier stage made the model an ONNX deployment file (int8 PTQ)."""
    from compress.stages.base import kind_before

    if state.recipe is None or state.stage is None or kind_before(state.recipe.stages, state.stage.index) != "onnx":
        return None
    src = next((Path(r["artifact"]) for r in reversed(state.results) if str(r.get("artifact") or "").endswith(".onnx")), None)
    if src is None or not src.is_file():
        raise CompressError(f"{state.stage.path}: the ONNX file the stage before made is missing "
                            f"({src or 'none in the report'}); start a new run")
    return src


@register_stage("encode", EncodeConfig, "store the model packed: sparse indices, codebooks, entropy coding (reloads bit-exact)",
                accepts=("torch", "fakequant", "packed", "onnx"))
def run_encode(state, cfg: EncodeConfig) -> StageResult:
    d = state.stage_dir
    out = (d if d is not None else Path(tempfile.mkdtemp(prefix="compress-encode-"))) / "model.cpk"
    src = _onnx_input(state)
    if src is None:
        model, facts = encode(state.model, cfg, out=out)
        prev = state.results[-1] if state.results else {}
        # the stage before saved as model.pt the very model just packed (teacher.pt: a trained teacher, another model)
        same = Path(prev.get("model_file") or "").name == "model.pt"
        facts["packed_bytes_of_stages"] = earlier_packed_sizes(state.results, facts["packed_bytes"] if same else None)
        return StageResult(model, artifact=Path(facts.pop("packed_file")), facts=facts)
    # After int8 PTQ the ONNX file ships: it is what gets packed, and this row measures the ONNX model read
    # back from the packed file (written out beside it, the file ONNX Runtime runs); the PyTorch model goes on.
    back, facts = encode_onnx(src, cfg, out=out)
    ran = out.with_suffix(".onnx")
    ran.write_bytes(back.model_bytes)
    from compress.evaluation import evaluate

    split = state.recipe.benchmark.split if state.recipe.benchmark else "test"
    metrics = evaluate(back, state.data, split if state.data.has(split) else "val", "cpu")
    return StageResult(state.model, artifact=Path(facts.pop("packed_file")), onnx=ran, metrics=metrics, facts=facts)
