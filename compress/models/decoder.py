"""What stages need to know about a decoder language model, declared once per family.

Distillation hints, Minitron-style width/depth pruning, weight-only quantization and ONNX export with a
key-value cache all ask the same questions of a causal LM: where are the decoder layers, which Linear is q,
k, v, o, up, gate, down (or the fused qkv / gate_up), how many query heads and key-value groups, where are
the embeddings and the LM head, are they tied, and which config fields hold the sizes (so a pruned model's
config can be rewritten and the model reloads with ``from_pretrained``). ``decoder_layout`` answers from a
table keyed by the transformers ``model_type``: a new family is one table entry, not a branch in a stage.

Module paths are relative to the decoder layer (``attn``/``mlp`` parts) or to the model the layout is
declared on (``layers``, ``embed``, ``lm_head``, ``final_norm``); ``prefixed`` moves them under a wrapper.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Optional

import torch.nn as nn


@dataclass(frozen=True)
class DecoderLayout:
    """One decoder family's module paths and config fields (``None``: the family has no such part)."""

    layers: str  # the ModuleList of decoder layers, from the model root
    embed: str  # token embedding
    lm_head: str
    final_norm: Optional[str]
    attn: str  # the attention block inside a layer
    q: Optional[str] = None  # inside ``attn``; None when fused into ``qkv``
    k: Optional[str] = None
    v: Optional[str] = None
    qkv: Optional[str] = None  # fused q|k|v projection (output rows: q heads, then k groups, then v groups)
    o: str = "o_proj"
    mlp: str = "mlp"
    up: Optional[str] = "up_proj"  # inside ``mlp``; None when fused into ``gate_up``
    gate: Optional[str] = "gate_proj"  # None: a plain two-layer MLP (GPT-2)
    gate_up: Optional[str] = None  # fused gate|up (output rows: gate, then up)
    down: str = "down_proj"
    position_embed: Optional[str] = None  # learned positions (GPT-2's wpe)
    conv1d: bool = False  # transformers' Conv1D (weight is [in, out]) instead of nn.Linear (GPT-2)
    norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")  # inside a layer, over the hidden size
    # config field names, so that pruned sizes can be written back and the saved folder reloads
    cfg_layers: str = "num_hidden_layers"
    cfg_heads: str = "num_attention_heads"
    cfg_kv_heads: Optional[str] = "num_key_value_heads"  # None: as many groups as heads
    cfg_hidden: str = "hidden_size"
    cfg_intermediate: Optional[str] = "intermediate_size"  # None: 4 x hidden (GPT-2's n_inner=None)
    # None or absent: hidden / heads; None: the family always derives it (GPT-2), so heads and the hidden
    # size can only shrink together
    cfg_head_dim: Optional[str] = "head_dim"
    cfg_per_layer: tuple[str, ...] = ("layer_types",)  # config lists with one entry per layer (Qwen2's layer_types)

    def prefixed(self, prefix: str) -> "DecoderLayout":
        """The layout of a wrapper whose ``prefix`` attribute holds this model (``IOModule.model``)."""
        p = f"{prefix}." if prefix else ""
        return replace(self, layers=p + self.layers, embed=p + self.embed, lm_head=p + self.lm_head,
                       final_norm=p + self.final_norm if self.final_norm else None,
                       position_embed=p + self.position_embed if self.position_embed else None)

    # -- sizes, read from a transformers config ---------------------------------------------------------
    def sizes(self, config: Any) -> dict[str, int]:
        """layers, heads, kv_heads, hidden, intermediate and head_dim of ``config``."""
        hidden = int(getattr(config, self.cfg_hidden))
        heads = int(getattr(config, self.cfg_heads))
        kv = getattr(config, self.cfg_kv_heads, None) if self.cfg_kv_heads else None
        inter = getattr(config, self.cfg_intermediate, None) if self.cfg_intermediate else None
        head_dim = getattr(config, self.cfg_head_dim, None) if self.cfg_head_dim else None
        return {"layers": int(getattr(config, self.cfg_layers)), "heads": heads, "kv_heads": int(kv or heads),
                "hidden": hidden, "intermediate": int(inter or 4 * hidden), "head_dim": int(head_dim or hidden // heads)}

    # -- modules --------------------------------------------------------------------------------------------
    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers)

    def part(self, layer: nn.Module, block: str, name: Optional[str]) -> Optional[nn.Module]:
        """``layer.<block>.<name>`` (e.g. ``part(layer, layout.attn, layout.q)``), None for an absent part."""
        if name is None:
            return None
        return layer.get_submodule(f"{block}.{name}")

    def linear_names(self, model: nn.Module) -> list[str]:
        """Every projection inside the decoder layers (what weight-only quantization touches by default:
        not the embeddings, not the LM head)."""
        out = []
        for i in range(len(self.decoder_layers(model))):
            for block, names in ((self.attn, (self.q, self.k, self.v, self.qkv, self.o)),
                                 (self.mlp, (self.gate, self.up, self.gate_up, self.down))):
                out += [f"{self.layers}.{i}.{block}.{n}" for n in names if n is not None]
        return out

    def tied(self, model: nn.Module) -> bool:
        """Whether the LM head shares its weight with the token embedding."""
        return model.get_submodule(self.lm_head).weight is model.get_submodule(self.embed).weight


_LLAMA = DecoderLayout(layers="model.layers", embed="model.embed_tokens", lm_head="lm_head",
                       final_norm="model.norm", attn="self_attn", q="q_proj", k="k_proj", v="v_proj")
LAYOUTS: dict[str, DecoderLayout] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,  # q_norm/k_norm act per head over head_dim: head pruning leaves them as they are
    "phi3": replace(_LLAMA, q=None, k=None, v=None, qkv="qkv_proj", up=None, gate=None, gate_up="gate_up_proj"),
    "gpt2": DecoderLayout(layers="transformer.h", embed="transformer.wte", lm_head="lm_head",
                          final_norm="transformer.ln_f", attn="attn", qkv="c_attn", o="c_proj", mlp="mlp",
                          up="c_fc", gate=None, down="c_proj", position_embed="transformer.wpe", conv1d=True,
                          cfg_layers="n_layer", cfg_heads="n_head", cfg_kv_heads=None, cfg_hidden="n_embd",
                          cfg_intermediate="n_inner", cfg_head_dim=None, norms=("ln_1", "ln_2")),
}


def layout_for(model_type: str) -> Optional[DecoderLayout]:
    """The declared layout of a transformers ``model_type`` (None: not a decoder family compress knows)."""
    return LAYOUTS.get(model_type)


def decoder_layout(model: nn.Module) -> Optional[DecoderLayout]:
    """The decoder layout declared on ``model`` (see ``compress.models.adapter.declare(decoder=...)``),
    else the table's entry for a bare transformers model's ``config.model_type``."""
    adapter = getattr(model, "compress_adapter", None)
    if adapter is not None and getattr(adapter, "decoder", None) is not None:
        return adapter.decoder
    cfg = getattr(model, "config", None)
    return layout_for(getattr(cfg, "model_type", "")) if cfg is not None else None


def families() -> list[str]:
    return sorted(LAYOUTS)


def hf_config(model: nn.Module):
    """The transformers config of ``model`` (bare or inside a wrapper)."""
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "model_type"):
            return cfg
    raise ValueError(f"{type(model).__name__} holds no transformers config")


def decoder_macs(model: nn.Module, layout: DecoderLayout, seq_len: int) -> int:
    """Multiply-accumulates of one forward pass over ``seq_len`` tokens: every projection and the LM head
    per token, plus the attention scores and the weighted sum of values (2 x seq_len^2 x heads x head_dim
    per layer, dense as SDPA computes them)."""
    s = layout.sizes(hf_config(model))

    def weights(name: str) -> int:  # a quantized layer (compress.quant.qat.QuantLayer) keeps its float shape
        m = model.get_submodule(name)
        shape = getattr(m, "weight_shape", None)
        return math.prod(shape) if shape is not None else m.weight.numel()

    per_token = sum(weights(n) for n in layout.linear_names(model)) + weights(layout.lm_head)
    return seq_len * per_token + s["layers"] * 2 * seq_len * seq_len * s["heads"] * s["head_dim"]


__all__ = ["DecoderLayout", "LAYOUTS", "decoder_layout", "decoder_macs", "families", "hf_config", "layout_for"]
