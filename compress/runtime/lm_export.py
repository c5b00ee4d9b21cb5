"""Causal LMs as ONNX files with a key-value cache, and one step interface over PyTorch and ONNX Runtime.

The file's interface is the one ONNX Runtime GenAI and Optimum use: inputs ``input_ids``, ``attention_mask``
(past + new tokens), ``position_ids`` and ``past_key_values.{i}.key/value`` ([batch, kv_heads, past, head_dim]);
outputs ``logits`` and ``present.{i}.key/value`` (past + new). Batch, sequence and past length are dynamic: a
prefill is a call with past length 0, a decode step a call with one new token.

Why a wrapper of our own: Optimum's exporter (optimum-onnx) pins transformers < 5 (huggingface/optimum-onnx
#114, #141) and ONNX Runtime GenAI's model builder writes its own graph from the weights (GroupQueryAttention,
a fixed-size cache buffer) for its own runtime, rather than exporting the PyTorch model it is given. So the
cache is flattened here: ``_CacheIO`` takes the past tensors as arguments, builds a transformers
``DynamicCache`` from them, and returns the present tensors; the TorchScript exporter (as ``to_onnx``) traces it.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn as nn

from compress.errors import CompressError

INPUTS = ("input_ids", "attention_mask", "position_ids")
REQUIRED = ("input_ids", "attention_mask")  # ORT GenAI's builder computes positions inside its graph


def past_names(layers: int) -> list[str]:
    return [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]


def present_names(layers: int) -> list[str]:
    return [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers causal LM inside ``model`` (compress's ``IOModule`` wrapper holds it as ``.model``)."""
    from compress.models.adapter import IOModule

    inner = model.model if isinstance(model, IOModule) else model
    if getattr(inner, "config", None) is None or not hasattr(inner, "get_output_embeddings"):
        raise CompressError(f"{type(model).__name__} is not a transformers causal LM (no config / LM head)")
    return inner


@dataclass(frozen=True)
class CacheShape:
    """What a cache holds per layer: [batch, kv_heads, length, head_dim] keys and values."""

    layers: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def of(cls, model: nn.Module) -> "CacheShape":
        from compress.models.decoder import decoder_layout

        lm = causal_lm(model)
        layout = decoder_layout(lm)
        if layout is None:
            from compress.models.decoder import families

            raise CompressError(f"{type(lm).__name__} ({lm.config.model_type}): no decoder layout; "
                                f"known families: {', '.join(families())}")
        s = layout.sizes(lm.config)
        return cls(s["layers"], s["kv_heads"], s["head_dim"], int(lm.config.vocab_size))

    def empty(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, self.kv_heads, 0, self.head_dim), np.float32) for _ in range(2 * self.layers)]


class _CacheIO(nn.Module):
    """The LM with its cache as flat tensors: (ids, mask, positions, k0, v0, k1, ...) -> (logits, k0', v0', ...)."""

    def __init__(self, lm: nn.Module, layers: int):
        super().__init__()
        self.lm, self.layers = lm, layers

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(self.layers)])
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                      use_cache=True)
        flat = []
        for layer in _cache_of(out).layers:
            flat += [layer.keys, layer.values]
        return (out.logits, *flat)


def _cache_of(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _linear_from_conv1d(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with transformers' Conv1D (GPT-2) as nn.Linear: Conv1D exports as Gemm on a 2-D view,
    which ONNX Runtime's MatMulNBits quantizer does not touch; Linear on 3-D input exports as MatMul + Add."""
    from transformers.pytorch_utils import Conv1D

    if not any(isinstance(m, Conv1D) for m in model.modules()):
        return model
    model = copy.deepcopy(model)
    for name, m in list(model.named_modules()):
        if isinstance(m, Conv1D):
            lin = nn.Linear(m.weight.shape[0], m.nf)
            with torch.no_grad():
                lin.weight.copy_(m.weight.t())
                lin.bias.copy_(m.bias)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, lin)
    return model


def export_lm(model: nn.Module, path: str | Path, opset: int = 17) -> Path:
    """Write ``model`` (a transformers causal LM, bare or compress-wrapped) as an fp32 ONNX file with a cache."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = CacheShape.of(model)
    lm = _linear_from_conv1d(causal_lm(model))
    was = lm.training
    lm.eval()
    wrapper = _CacheIO(lm, shape.layers)
    b, s, p = 2, 3, 2  # distinct sizes so that the tracer keeps no axis as a constant
    args = (torch.ones(b, s, dtype=torch.long), torch.ones(b, p + s, dtype=torch.long),
            torch.arange(p, p + s).expand(b, s).contiguous(),
            *[torch.zeros(b, shape.kv_heads, p, shape.head_dim) for _ in range(2 * shape.layers)])
    past, present = past_names(shape.layers), present_names(shape.layers)
    axes: dict[str, dict[int, str]] = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "total"},
                                       "position_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"}}
    axes.update({n: {0: "batch", 2: "past"} for n in past})
    axes.update({n: {0: "batch", 2: "total"} for n in present})
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapper, args, str(path), dynamo=False, opset_version=opset,
                              input_names=[*INPUTS, *past], output_names=["logits", *present], dynamic_axes=axes)
    except Exception as exc:
        from compress.errors import error_line

        raise CompressError(f"cannot export {type(lm).__name__} with a cache to ONNX (opset {opset}): "
                            f"{error_line(exc)}") from None
    finally:
        lm.train(was)
    return path


# -- one step interface: prefill and decode alike, in PyTorch or ONNX Runtime --------------------------------

class StepLM:
    """``step(ids, mask, positions, cache) -> (logits [B, S, V] float32, cache)``; ``empty_cache(batch)``.

    Generation, perplexity and the tokens/s timers use this and nothing else, so a PyTorch model and its ONNX
    file run the same loop."""

    shape: CacheShape
    runtime = ""

    def empty_cache(self, batch: int) -> Any:
        raise NotImplementedError

    def step(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, cache: Any) -> tuple[np.ndarray, Any]:
        raise NotImplementedError


class OrtLM(StepLM):
    """An ONNX file with a cache in an ONNX Runtime session (``threads`` None: one per core)."""

    runtime = "onnxruntime"

    def __init__(self, source, threads: Optional[int] = 1):
        from compress.runtime.onnx import onnx_session

        self.session = source if hasattr(source, "run") else onnx_session(source, threads)
        self.name = "ONNX model" if hasattr(source, "run") else str(source)
        self.shape = cache_shape(self.session, self.name)
        self.past = past_names(self.shape.layers)
        self.positions = any(i.name == "position_ids" for i in self.session.get_inputs())

    def empty_cache(self, batch: int) -> list[np.ndarray]:
        return self.shape.empty(batch)

    def step(self, ids, mask, positions, cache):
        feed = {"input_ids": ids.astype(np.int64), "attention_mask": mask.astype(np.int64), **dict(zip(self.past, cache))}
        if self.positions:
            feed["position_ids"] = positions.astype(np.int64)
        out = self.session.run(None, feed)
        return out[0], out[1:]


class TorchLM(StepLM):
    """A transformers causal LM in PyTorch eager, with transformers' ``DynamicCache``."""

    runtime = "pytorch"

    def __init__(self, model: nn.Module):
        self.model = causal_lm(model).eval()
        self.shape = CacheShape.of(model)

    def empty_cache(self, batch: int):
        return None

    def step(self, ids, mask, positions, cache):
        t = torch.from_numpy
        with torch.inference_mode():
            out = self.model(input_ids=t(ids.astype(np.int64)), attention_mask=t(mask.astype(np.int64)),
                             position_ids=t(positions.astype(np.int64)), cache=cache, use_cache=True)
        return out.logits.float().numpy(), _cache_of(out)


def step_lm(source, threads: Optional[int] = 1) -> StepLM:
    """A StepLM of an nn.Module, an ONNX path or an ORT session."""
    if isinstance(source, StepLM):
        return source
    if isinstance(source, nn.Module):
        return TorchLM(source)
    return OrtLM(source, threads)


def cache_shape(session, where: str = "ONNX model") -> CacheShape:
    """The cache a session's inputs declare, or one line saying why the file cannot decode with a cache."""
    names = {i.name: i for i in session.get_inputs()}
    missing = [n for n in REQUIRED if n not in names]
    if "input_ids" in missing:
        raise CompressError(f"{where}: not a language model file (no 'input_ids' input; inputs: "
                            f"{', '.join(names)})")
    keys = sorted((n for n in names if n.startswith("past_key_values.") and n.endswith(".key")),
                  key=lambda n: int(n.split(".")[1]))
    if not keys:
        raise CompressError(f"{where}: no key-value cache (no past_key_values.* inputs): generation would recompute "
                            "the whole sequence per token; export it with compress (compress.runtime.lm_export.export_lm)")
    if missing:
        raise CompressError(f"{where}: missing input(s) {', '.join(missing)}; expected {', '.join(REQUIRED)} and the cache")
    dims = names[keys[0]].shape  # [batch, kv_heads, past, head_dim]
    logits = [o for o in session.get_outputs() if o.name == "logits"]
    vocab = logits[0].shape[-1] if logits and isinstance(logits[0].shape[-1], int) else 0
    if len(dims) == 4 and isinstance(dims[1], int) and not isinstance(dims[3], int):
        dims = [*dims[:3], _genai_head_size(where)]  # ORT GenAI's builder names head_dim 'kv_cache_dim'
    if len(dims) != 4 or not all(isinstance(d, int) for d in (dims[1], dims[3])):
        raise CompressError(f"{where}: cache input {keys[0]} has shape {dims}; expected [batch, kv_heads, past, head_dim]")
    return CacheShape(len(keys), int(dims[1]), int(dims[3]), int(vocab))


def _genai_head_size(where: str):
    """``head_size`` from the genai_config.json that ORT GenAI's builder writes beside its model.onnx (None: none)."""
    import json

    cfg = Path(where).parent / "genai_config.json"
    try:
        return int(json.loads(cfg.read_text())["model"]["decoder"]["head_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def is_lm_file(path: str | Path) -> bool:
    """Whether an ONNX file has a cache input (``past_key_values.*``): read from the graph, no session."""
    import onnx

    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception:
        return False
    return any(i.name.startswith("past_key_values.") for i in graph.input)


__all__ = ["CacheShape", "OrtLM", "StepLM", "TorchLM", "cache_shape", "causal_lm", "export_lm", "is_lm_file",
           "past_names", "present_names", "step_lm"]
