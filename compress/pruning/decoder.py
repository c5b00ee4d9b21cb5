"""Minitron-style structured pruning of decoder language models: attention heads (whole key-value groups, or
query heads evenly within the groups), MLP neurons, the hidden size, and whole decoder layers.

Muralidharan et al. 2024 ("Compact Language Models via Pruning and Knowledge Distillation") rank each part by
its activations on a few calibration batches and prune once; the widths stay the same in every layer, so the
pruned model is again one config (``save_pretrained`` -> ``from_pretrained`` reloads it) and a compress
checkpoint replays the new sizes (the ``decoder_prune`` transform). Which module is q/k/v/o, gate/up/down, a
norm or the embedding comes from the family's ``DecoderLayout`` (``compress.models.decoder``): no family is
named here.

Rows and columns are selected by hand (``_select``): torch-pruning's functional pruners take removal indices
per module type and know neither transformers' Conv1D (GPT-2, weight [in, out]) nor the RMSNorms, and the GQA
coupling (a key-value group and its query heads; fused q|k|v and gate|up rows) is the layout's, not a graph's.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field, ValidationError, field_validator, model_validator

from compress.checkpoint_io import TRANSFORMS, record_transform
from compress.config import MethodConfig, StrictModel, Width
from compress.errors import RecipeError
from compress.models.decoder import DecoderLayout, decoder_layout, decoder_macs, families, hf_config
from compress.pruning.methods import BudgetConfig, PruneConfig, Pruner, Ratio, register_prune_method
from compress.registry import Registry, did_you_mean

# -- calibration batches ------------------------------------------------------------------------------------


def _input_ids(x: Any) -> torch.Tensor:
    return x["input_ids"] if isinstance(x, dict) else x


def _logits(model: nn.Module, x: Any) -> torch.Tensor:
    from compress.models.adapter import logits_of

    return logits_of(model(**x) if isinstance(x, dict) else model(x))


def calibration_inputs(batches: Iterable, n: Optional[int] = None, device=None) -> list:
    """The model inputs of up to ``n`` batches: a batch is input ids, a dict of named inputs, or an
    ``(inputs, targets, ...)`` tuple as data loaders give them."""
    from compress.data.inputs import to_device

    out = []
    for b in batches:
        if n is not None and len(out) >= n:
            break
        x = b[0] if isinstance(b, (tuple, list)) else b
        out.append(to_device(x, device) if device is not None else x)
    return out


@torch.no_grad()
def token_nll(model: nn.Module, batches: list) -> float:
    """Mean next-token NLL over the batches' input ids (each block's first token has no prediction)."""
    total, count = 0.0, 0
    for x in batches:
        ids = _input_ids(x)
        logits = _logits(model, x)[:, :-1]
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1), reduction="sum"))
        count += ids[:, 1:].numel()
    return total / max(count, 1)


@contextlib.contextmanager
def _eval(model: nn.Module):
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


# -- importance plug-ins -----------------------------------------------------------------------------------

@dataclass
class WidthScores:
    """Higher is more important: per decoder layer one score per query head and per MLP neuron, and one
    score per hidden channel for the whole model."""

    heads: list[torch.Tensor]
    neurons: list[torch.Tensor]
    hidden: torch.Tensor


LM_IMPORTANCES: Registry = Registry("LM importance")


class LMImportanceConfig(MethodConfig):
    """How heads, neurons and hidden channels are ranked (``importance: {method: activation, batch: l2}``)."""

    METHODS: ClassVar[Registry] = LM_IMPORTANCES
    DEFAULT: ClassVar[str] = "activation"
    method: str = "activation"

    def scores(self, model: nn.Module, layout: DecoderLayout, batches: list) -> WidthScores:
        raise NotImplementedError


def register_lm_importance(config: type[LMImportanceConfig]) -> type[LMImportanceConfig]:
    name = config.model_fields["method"].default
    LM_IMPORTANCES.register(name, config=config, description=(config.__doc__ or "").strip().splitlines()[0])(config)
    return config


class _Agg:
    """Aggregate |activations| [batch, seq, features] over the sequence, then over the batch (running over
    calibration batches): ``mean`` or ``l2`` (root of the sum of squares) on each axis."""

    def __init__(self, seq: str, batch: str):
        self.seq, self.batch, self.total, self.n = seq, batch, None, 0

    def add(self, a: torch.Tensor) -> None:
        a = a.detach().float().reshape(a.shape[0], -1, a.shape[-1])
        s = a.mean(1) if self.seq == "mean" else a.pow(2).sum(1).sqrt()
        t = s.sum(0) if self.batch == "mean" else s.pow(2).sum(0)
        self.total = t if self.total is None else self.total + t
        self.n += a.shape[0]

    def value(self) -> torch.Tensor:
        return self.total / max(self.n, 1) if self.batch == "mean" else self.total.sqrt()


def _attn_in(layout: DecoderLayout, layer: nn.Module) -> nn.Module:
    return layout.part(layer, layout.attn, layout.qkv or layout.q)


def _mlp_in(layout: DecoderLayout, layer: nn.Module) -> nn.Module:
    return layout.part(layer, layout.mlp, layout.gate_up or layout.gate or layout.up)


@register_lm_importance
class ActivationImportance(LMImportanceConfig):
    """Minitron's activation importance: |attention output| per head (L2 over head_dim), |input of the down
    projection| per neuron, |normed hidden state| per channel (the inputs of every layer's first attention
    and MLP projection and of the LM head), aggregated over the sequence, then over the batch."""

    method: Literal["activation"] = "activation"
    # Minitron's best aggregation for width ("Minitron approach in practice", Sreenivas et al. 2024): L2 over
    # the batch, mean over the sequence.
    batch: Literal["l2", "mean"] = "l2"
    seq: Literal["mean", "l2"] = "mean"

    @torch.no_grad()
    def scores(self, model, layout, batches):
        d = layout.sizes(hf_config(model))["head_dim"]
        layers = layout.decoder_layers(model)
        heads = [_Agg(self.seq, self.batch) for _ in layers]
        neurons = [_Agg(self.seq, self.batch) for _ in layers]
        hidden = _Agg(self.seq, self.batch)
        handles = []

        def pre(fn):
            return lambda m, args: fn(args[0])

        try:
            for i, layer in enumerate(layers):
                o = layout.part(layer, layout.attn, layout.o)
                handles.append(o.register_forward_pre_hook(pre(lambda x, i=i: heads[i].add(x.unflatten(-1, (-1, d)).norm(dim=-1)))))
                down = layout.part(layer, layout.mlp, layout.down)
                handles.append(down.register_forward_pre_hook(pre(lambda x, i=i: neurons[i].add(x.abs()))))
                for m in (_attn_in(layout, layer), _mlp_in(layout, layer)):
                    handles.append(m.register_forward_pre_hook(pre(lambda x: hidden.add(x.abs()))))
            handles.append(model.get_submodule(layout.lm_head).register_forward_pre_hook(pre(lambda x: hidden.add(x.abs()))))
            with _eval(model):
                for x in batches:
                    _logits(model, x)
        finally:
            for h in handles:
                h.remove()
        return WidthScores([h.value() for h in heads], [n.value() for n in neurons], hidden.value())


def _as_out_in(m: nn.Module, conv1d: bool) -> torch.Tensor:
    """A projection's weight as [out, in] (Conv1D stores [in, out])."""
    return m.weight.t() if conv1d else m.weight


@register_lm_importance
class MagnitudeImportance(LMImportanceConfig):
    """Weight norms, no data: a head's columns of the output projection, a neuron's column of the down
    projection, a hidden channel's column of the token embedding (a baseline for activation importance)."""

    method: Literal["magnitude"] = "magnitude"

    @torch.no_grad()
    def scores(self, model, layout, batches):
        d = layout.sizes(hf_config(model))["head_dim"]
        heads, neurons = [], []
        for layer in layout.decoder_layers(model):
            o = _as_out_in(layout.part(layer, layout.attn, layout.o), layout.conv1d).float()
            heads.append(o.unflatten(1, (-1, d)).pow(2).sum((0, 2)).sqrt())
            neurons.append(_as_out_in(layout.part(layer, layout.mlp, layout.down), layout.conv1d).float().norm(dim=0))
        return WidthScores(heads, neurons, model.get_submodule(layout.embed).weight.float().norm(dim=0))


@register_lm_importance
class RandomImportance(LMImportanceConfig):
    """Random ranks (seeded): the floor any importance should beat."""

    method: Literal["random"] = "random"
    seed: int = Field(0, ge=0)

    def scores(self, model, layout, batches):
        g = torch.Generator().manual_seed(self.seed)
        s = layout.sizes(hf_config(model))
        layers = range(len(layout.decoder_layers(model)))
        return WidthScores([torch.rand(s["heads"], generator=g) for _ in layers],
                           [torch.rand(s["intermediate"], generator=g) for _ in layers], torch.rand(s["hidden"], generator=g))


@contextlib.contextmanager
def _skipped(layer: nn.Module):
    """The layer passes its input hidden states through unchanged (its output replaced by its input)."""
    def hook(m, args, kwargs, out):
        h = args[0] if args else kwargs["hidden_states"]
        return h if isinstance(out, torch.Tensor) else (h, *out[1:])

    handle = layer.register_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def layer_importance(model: nn.Module, layout: DecoderLayout, batches: list, how: str = "nll") -> torch.Tensor:
    """One score per decoder layer, higher is more important. ``nll``: how much the calibration batches' mean
    token NLL rises when the layer is skipped (Minitron ranks depth by the LM loss). ``cosine``: block
    importance 1 - cos(layer input, layer output), averaged over tokens (ShortGPT, Men et al. 2024)."""
    layers = layout.decoder_layers(model)
    with _eval(model):
        if how == "nll":
            base = token_nll(model, batches)
            out = []
            for layer in layers:
                with _skipped(layer):
                    out.append(token_nll(model, batches) - base)
            return torch.tensor(out)
        sums, count, handles = torch.zeros(len(layers)), [0] * len(layers), []

        def hook(i):
            def fn(m, args, kwargs, out):
                h_in = (args[0] if args else kwargs["hidden_states"]).float()
                h_out = (out if isinstance(out, torch.Tensor) else out[0]).float()
                cos = F.cosine_similarity(h_in.reshape(-1, h_in.shape[-1]), h_out.reshape(-1, h_out.shape[-1]), dim=-1)
                sums[i] += float((1 - cos).sum())
                count[i] += cos.numel()
            return fn

        try:
            handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
            for x in batches:
                _logits(model, x)
        finally:
            for h in handles:
                h.remove()
        return sums / torch.tensor([max(c, 1) for c in count], dtype=torch.float)


# -- surgery ----------------------------------------------------------------------------------------------

def _configs(model: nn.Module) -> list:
    seen: dict[int, Any] = {}
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "model_type"):
            seen.setdefault(id(cfg), cfg)
    return list(seen.values())


def _set(m: nn.Module, name: str, t: torch.Tensor) -> None:
    old = getattr(m, name)
    setattr(m, name, nn.Parameter(t.contiguous(), requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else t)


def _unchanged(idx: torch.Tensor, n: int) -> bool:
    return len(idx) == n and bool((idx.cpu() == torch.arange(n, device="cpu")).all())


def _select_out(m: nn.Module, idx: torch.Tensor, conv1d: bool) -> None:
    """Keep output features ``idx`` of a Linear (weight [out, in]) or Conv1D (weight [in, out])."""
    dim = 1 if conv1d else 0
    if _unchanged(idx, m.weight.shape[dim]):
        return
    idx = idx.to(m.weight.device)
    _set(m, "weight", m.weight.detach().index_select(dim, idx))
    if getattr(m, "bias", None) is not None:
        _set(m, "bias", m.bias.detach().index_select(0, idx))
    if conv1d:
        m.nf = len(idx)
    else:
        m.out_features = len(idx)


def _select_in(m: nn.Module, idx: torch.Tensor, conv1d: bool) -> None:
    """Keep input features ``idx`` (an nn.Embedding's columns are its inputs here: the hidden channels)."""
    dim = 0 if conv1d else 1
    if _unchanged(idx, m.weight.shape[dim]):
        return
    _set(m, "weight", m.weight.detach().index_select(dim, idx.to(m.weight.device)))
    if isinstance(m, nn.Embedding):
        m.embedding_dim = len(idx)
    elif conv1d:
        m.nx = len(idx)
    else:
        m.in_features = len(idx)


def _select_vec(m: nn.Module, idx: torch.Tensor) -> None:
    """Keep channels ``idx`` of a norm (weight and bias, whatever its class)."""
    if _unchanged(idx, m.weight.shape[0]):
        return
    for name in ("weight", "bias"):
        if getattr(m, name, None) is not None:
            _set(m, name, getattr(m, name).detach().index_select(0, idx.to(m.weight.device)))
    if isinstance(getattr(m, "normalized_shape", None), tuple):
        m.normalized_shape = (len(idx),)


def _rows(groups: torch.Tensor, d: int) -> torch.Tensor:
    """The rows of heads ``groups`` when each head owns ``d`` consecutive rows."""
    return (groups[:, None] * d + torch.arange(d, device="cpu")[None, :]).reshape(-1)


@dataclass
class Plan:
    """What stays, in current indices: decoder layers (in order), and per kept layer the query heads and
    key-value groups (query head j of the result belongs to group j // (heads / kv_heads)) and MLP neurons;
    the hidden channels of the whole model."""

    layers: list[int]
    q: list[torch.Tensor]
    kv: list[torch.Tensor]
    neurons: list[torch.Tensor]
    hidden: torch.Tensor


def apply_plan(model: nn.Module, layout: DecoderLayout, plan: Plan) -> dict[str, int]:
    """Cut ``model`` in place to ``plan``; rewrite its config and the modules' size attributes. Returns the new sizes."""
    cfg = hf_config(model)
    old = layout.sizes(cfg)
    d, conv1d = old["head_dim"], layout.conv1d
    H, KV, I = old["heads"], old["kv_heads"], old["intermediate"]
    tied = layout.tied(model)
    all_layers = layout.decoder_layers(model)
    kept = nn.ModuleList([all_layers[i] for i in plan.layers])
    model.set_submodule(layout.layers, kept)
    hid = plan.hidden
    for j, layer in enumerate(kept):
        for m in layer.modules():  # caches index their key/value store by layer_idx
            if isinstance(getattr(m, "layer_idx", None), int):
                m.layer_idx = j
        rq, rkv = _rows(plan.q[j], d), _rows(plan.kv[j], d)
        if layout.qkv:
            fused = torch.cat([rq, H * d + rkv, (H + KV) * d + rkv])
            _select_out(layout.part(layer, layout.attn, layout.qkv), fused, conv1d)
        else:
            _select_out(layout.part(layer, layout.attn, layout.q), rq, conv1d)
            for name in (layout.k, layout.v):
                _select_out(layout.part(layer, layout.attn, name), rkv, conv1d)
        o = layout.part(layer, layout.attn, layout.o)
        _select_in(o, rq, conv1d)
        n = plan.neurons[j]
        if layout.gate_up:
            _select_out(layout.part(layer, layout.mlp, layout.gate_up), torch.cat([n, I + n]), conv1d)
        for name in (layout.gate, layout.up):
            if name:
                _select_out(layout.part(layer, layout.mlp, name), n, conv1d)
        down = layout.part(layer, layout.mlp, layout.down)
        _select_in(down, n, conv1d)
        # the hidden size: every projection's input from the residual stream, every output into it, the norms
        for name in (layout.q, layout.k, layout.v, layout.qkv):
            if name:
                _select_in(layout.part(layer, layout.attn, name), hid, conv1d)
        for name in (layout.gate, layout.up, layout.gate_up):
            if name:
                _select_in(layout.part(layer, layout.mlp, name), hid, conv1d)
        _select_out(o, hid, conv1d)
        _select_out(down, hid, conv1d)
        for name in layout.norms:
            _select_vec(layer.get_submodule(name), hid)
    for name in (layout.embed, layout.position_embed):
        if name:
            _select_in(model.get_submodule(name), hid, False)
    if layout.final_norm:
        _select_vec(model.get_submodule(layout.final_norm), hid)
    head = model.get_submodule(layout.lm_head)
    if tied:
        head.weight = model.get_submodule(layout.embed).weight
        head.in_features = len(hid)
    else:
        _select_in(head, hid, False)

    new = {"layers": len(plan.layers), "heads": len(plan.q[0]) if plan.q else H, "kv_heads": len(plan.kv[0]) if plan.kv else KV,
           "hidden": len(hid), "intermediate": len(plan.neurons[0]) if plan.neurons else I, "head_dim": d}
    for c in _configs(model):
        for name in layout.cfg_per_layer:
            v = getattr(c, name, None)
            if isinstance(v, (list, tuple)) and len(v) == old["layers"]:
                setattr(c, name, [v[i] for i in plan.layers])
        for field, key in ((layout.cfg_layers, "layers"), (layout.cfg_heads, "heads"), (layout.cfg_kv_heads, "kv_heads"),
                           (layout.cfg_hidden, "hidden"), (layout.cfg_intermediate, "intermediate"),
                           (layout.cfg_head_dim, "head_dim")):
            if field:  # head_dim written explicitly: heads x head_dim no longer equals the hidden size
                setattr(c, field, new[key])
    # Attention and MLP modules keep sizes they read from the config at construction (GQA's repeat count,
    # GPT-2's split size): rewrite every such attribute that held the old value.
    attrs = {"num_key_value_groups": (H // KV, new["heads"] // new["kv_heads"]), "num_key_value_heads": (KV, new["kv_heads"]),
             "num_heads": (H, new["heads"]), "num_attention_heads": (H, new["heads"]), "hidden_size": (old["hidden"], new["hidden"]),
             "embed_dim": (old["hidden"], new["hidden"]), "split_size": (H * d, new["heads"] * d),
             "intermediate_size": (I, new["intermediate"])}
    for m in model.modules():
        for k, (was, now) in attrs.items():
            v = m.__dict__.get(k)
            if type(v) is int and v == was:
                setattr(m, k, now)
    return layout.sizes(cfg)


def _topk_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest scores, in their original order (ties: the earlier index)."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return torch.tensor(sorted(order[:k]), dtype=torch.long, device="cpu")


def make_plan(layout: DecoderLayout, sizes: dict, width: WidthScores, depth: torch.Tensor, target: dict) -> Plan:
    """Keep the most important parts: ``target`` layers (by ``depth``), per kept layer ``kv_heads`` key-value
    groups (a group scores the sum of its query heads) and the ``heads / kv_heads`` best query heads of each,
    ``intermediate`` neurons; ``hidden`` channels overall."""
    KV, g = sizes["kv_heads"], sizes["heads"] // sizes["kv_heads"]
    layers = _topk_sorted(depth, target["layers"]).tolist()
    qs, kvs, ns = [], [], []
    gt = target["heads"] // target["kv_heads"]
    for i in layers:
        h = width.heads[i].reshape(KV, g)
        groups = _topk_sorted(h.sum(1), target["kv_heads"])
        kvs.append(groups)
        qs.append(torch.cat([gr * g + _topk_sorted(h[gr], gt) for gr in groups.tolist()]))
        ns.append(_topk_sorted(width.neurons[i], target["intermediate"]))
    return Plan(layers, qs, kvs, ns, _topk_sorted(width.hidden, target["hidden"]))


def first_plan(sizes: dict, layers: list[int], target: dict) -> Plan:
    """The plan that keeps the first parts of each kind (shapes only: a reload's weights come after)."""
    g = sizes["heads"] // sizes["kv_heads"]
    gt = target["heads"] // target["kv_heads"]
    def arange(n: int) -> torch.Tensor:  # on the CPU even where a load's dry run makes meta the default device
        return torch.arange(n, device="cpu")

    kv = arange(target["kv_heads"])
    q = torch.cat([gr * g + arange(gt) for gr in kv.tolist()])
    return Plan(list(layers), [q] * len(layers), [kv] * len(layers), [arange(target["intermediate"])] * len(layers),
                arange(target["hidden"]))


_SIZE_KEYS = ("layers", "heads", "kv_heads", "hidden", "intermediate", "head_dim")


@TRANSFORMS.register("decoder_prune", description="cut a decoder LM to pruned layers, heads, MLP and hidden sizes")
def replay_decoder_prune(model: nn.Module, params: dict, state_dict: dict) -> nn.Module:
    layout = decoder_layout(model)
    if layout is None:
        raise ValueError("the model has no decoder layout")
    sizes, layers = params.get("sizes"), params.get("layers")
    now = layout.sizes(hf_config(model))
    if not isinstance(sizes, dict) or not all(type(sizes.get(k)) is int and 1 <= sizes[k] <= now[k] for k in _SIZE_KEYS) \
            or sizes["head_dim"] != now["head_dim"] or sizes["heads"] % sizes["kv_heads"] or \
            (now["heads"] // now["kv_heads"]) < sizes["heads"] // sizes["kv_heads"]:
        raise ValueError(f"sizes {str(sizes)[:120]} do not fit the model's {now}")
    if layout.cfg_head_dim is None and sizes["hidden"] != sizes["heads"] * sizes["head_dim"]:
        # GPT-2 derives head_dim from hidden / heads: any other record would reload as a different model
        raise ValueError(f"sizes {str(sizes)[:120]}: hidden must be heads x head_dim for {type(model).__name__}")
    if not isinstance(layers, list) or len(layers) != sizes["layers"] or \
            not all(type(i) is int and 0 <= i < now["layers"] for i in layers) or len(set(layers)) != len(layers):
        raise ValueError(f"kept layers {str(layers)[:120]} do not fit the model's {now['layers']} layers")
    apply_plan(model, layout, first_plan(now, layers, sizes))
    return model


# -- counting ---------------------------------------------------------------------------------------------

# -- the prune method -------------------------------------------------------------------------------------

class DecoderSizes(StrictModel):
    """Exact sizes to prune to (what Minitron's architecture search would pick); absent keys stay."""

    layers: Optional[Width] = None
    heads: Optional[Width] = None
    kv_heads: Optional[Width] = None
    intermediate: Optional[Width] = None
    hidden: Optional[Width] = None


class DecoderPruneConfig(PruneConfig):
    """Structured pruning of decoder LMs (Minitron): attention heads, MLP neurons, the hidden size and whole
    layers, ranked on calibration batches; the model really shrinks and reloads with from_pretrained."""

    method: Literal["decoder"] = "decoder"
    BUDGET_KINDS: ClassVar[tuple[str, ...]] = ("params", "macs")
    LANDS_BUDGET: ClassVar[bool] = True  # each step's sizes are bisected onto the budget (DecoderPruner._landing)
    # Fractions removed (without a budget: exactly these; with one: the split, all scaled by one factor until
    # the budget lands). Default: Llama-3.1-Minitron-4B-Width's cut (hidden 4096 -> 3072, MLP 14336 -> 9216;
    # heads and layers kept), the papers' finding that width beats depth at equal size after distillation.
    depth: Ratio = 0.0  # of the decoder layers
    heads: Ratio = 0.0  # of the query heads (GPT-2, whose head_dim is hidden / heads: the same as hidden)
    mlp: Ratio = 0.36  # of the MLP neurons
    hidden: Ratio = 0.25  # of the hidden (embedding) channels
    head_mode: Literal["groups", "within"] = "groups"  # drop whole key-value groups, or query heads in every group
    sizes: Optional[DecoderSizes] = None  # exact target sizes instead of ratios
    importance: LMImportanceConfig = ActivationImportance()
    depth_importance: Literal["nll", "cosine"] = "nll"
    calibration_batches: int = Field(8, ge=1)  # training batches the importances are computed on
    max_ratio: float = Field(0.9, gt=0, lt=1)  # with a budget, no part loses more than this fraction
    # MLP and hidden sizes cut to a multiple of this (at least one multiple): int4 groups of 32 need widths
    # that 32 divides, and kernels run faster on round widths. Ratios and budgets only (exact sizes are exact).
    multiple_of: int = Field(1, ge=1)

    @field_validator("importance", mode="before")
    @classmethod
    def _importance(cls, v):
        if isinstance(v, str):
            v = {"method": v}
        if isinstance(v, dict):
            names = LM_IMPORTANCES.names()
            name = v.get("method", LMImportanceConfig.DEFAULT)
            if name not in names:
                raise ValueError(f"unknown importance {name!r}; expected one of {', '.join(names)}{did_you_mean(str(name), names)}")
            try:
                return LM_IMPORTANCES.get(name).config.model_validate(v)
            except ValidationError as exc:
                raise ValueError("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())) from None
        return v

    @model_validator(mode="after")
    def _something(self):
        if self.sizes is None and not (self.depth or self.heads or self.mlp or self.hidden):
            raise ValueError("nothing to prune: give depth, heads, mlp or hidden a fraction above 0, or sizes")
        return self

    def check_rules(self, path: str) -> None:
        if self.budget is not None and self.budget.kind not in self.BUDGET_KINDS:
            raise RecipeError(f"{path}.budget.kind", f"'{self.budget.kind}': decoder pruning lands params or macs budgets")
        super().check_rules(path)
        if self.layer_ratios:
            raise RecipeError(f"{path}.layer_ratios", "decoder widths are the same in every layer (one config); "
                                                      "use heads, mlp, hidden and depth")
        if self.sizes is not None and self.budget is not None:
            raise RecipeError(f"{path}.sizes", "give exact sizes or a budget, not both")

    def measure(self, kind: str, model: nn.Module, example: Any) -> Optional[float]:
        if kind != "macs":
            return None
        return float(decoder_macs(model, decoder_layout(model), int(_input_ids(example).shape[-1])))

    def pruner(self, model, layers, example, data, path, device) -> Pruner:
        if data is None:  # compress.pruning.Pruner in a user's loop: the example batch is the calibration
            if example is None:
                raise RecipeError(f"{path}.method", "decoder pruning ranks heads, neurons and layers on calibration "
                                                    "batches: give example_inputs (token ids) or data")
            batches = calibration_inputs([example], 1, device)
        else:
            batches = calibration_inputs(data.loader("train", shuffle=False), self.calibration_batches, device)
        return DecoderPruner(self, model, batches, path)


register_prune_method(DecoderPruneConfig)


def _ratio_error(path: str, key: str, msg: str) -> RecipeError:
    return RecipeError(f"{path}.{key}", msg)


class DecoderPruner(Pruner):
    """Each step ranks the current model's parts (once; a budget's bisection forks reuse the ranking), then
    cuts every layer to the step's sizes: the configured fractions of the sizes this pruner started from,
    times the step's share of the schedule."""

    def __init__(self, cfg: DecoderPruneConfig, model: nn.Module, batches: list, path: str = "prune"):
        layout = decoder_layout(model)
        if layout is None:
            raise RecipeError(f"{path}.method", f"'decoder' prunes decoder language models ({', '.join(families())}); "
                                                f"{type(model).__name__} declares no decoder layout")
        self.cfg, self.model, self.layout, self.data, self.path = cfg, model, layout, batches, path
        self.orig = layout.sizes(hf_config(model))
        for i, layer in enumerate(layout.decoder_layers(model)):
            layer.compress_layer_origin = i  # which input layer each survivor was (the transform's record)
        self.final = self._final_sizes()
        self.scores: Optional[tuple[WidthScores, torch.Tensor]] = None
        self.sizes = dict(self.orig)
        # the budget's counts cut a meta-device copy of the model as it is now (orig sizes)
        self._skeleton = copy.deepcopy(model).to("meta") if cfg.budget is not None else None
        self._base: Optional[float] = None

    # -- what the sizes are ------------------------------------------------------------------------------
    def _final_sizes(self) -> dict:
        """Sizes at the end of the schedule (scale 1; with a budget, the largest scale the split allows)."""
        cfg, o, p = self.cfg, self.orig, self.path
        g0 = o["heads"] // o["kv_heads"]
        tied = self.layout.cfg_head_dim is None  # head_dim = hidden / heads: heads and hidden go together
        if cfg.sizes is not None:
            s = cfg.sizes.model_dump(exclude_none=True)
            for k in ("layers", "heads", "kv_heads", "intermediate", "hidden"):
                if s.get(k, 0) > o[k]:
                    raise _ratio_error(p, f"sizes.{k}", f"asks for {s[k]} {k.replace('_', ' ')}; the model has {o[k]}")
            if tied and "heads" in s and "hidden" in s and s["hidden"] != s["heads"] * o["head_dim"]:
                raise _ratio_error(p, "sizes.hidden", f"{self._family()} derives head_dim from hidden / heads: hidden must be "
                                                      f"heads x {o['head_dim']} = {s['heads'] * o['head_dim']}, got {s['hidden']}")
            if tied and "hidden" in s and "heads" not in s:
                if s["hidden"] % o["head_dim"]:
                    raise _ratio_error(p, "sizes.hidden", f"{self._family()} derives head_dim from hidden / heads: hidden "
                                                          f"must be a multiple of head_dim {o['head_dim']}, got {s['hidden']}")
                s["heads"] = s["hidden"] // o["head_dim"]
            heads = s.get("heads", o["heads"])
            kv = s.get("kv_heads", o["kv_heads"] if heads % o["kv_heads"] == 0 else heads // g0 if heads % g0 == 0 else 0)
            if not kv or heads % kv:
                raise _ratio_error(p, "sizes.kv_heads", f"{heads} heads do not split into {kv or o['kv_heads']} key-value groups; "
                                                        "heads must be a multiple of kv_heads")
            if heads // kv > g0:
                raise _ratio_error(p, "sizes.heads", f"{heads} heads in {kv} groups is {heads // kv} per group; the model "
                                                     f"has {g0} query heads per key-value group")
            return {"layers": s.get("layers", o["layers"]), "heads": heads, "kv_heads": kv,
                    "intermediate": s.get("intermediate", o["intermediate"]),
                    "hidden": heads * o["head_dim"] if tied else s.get("hidden", o["hidden"]), "head_dim": o["head_dim"]}
        heads = cfg.heads
        if tied:
            if cfg.heads and cfg.hidden and cfg.heads != cfg.hidden:
                raise _ratio_error(p, "heads", f"{self._family()} derives head_dim from hidden / heads, so heads and hidden "
                                               f"shrink together: give one fraction (got heads {cfg.heads}, hidden {cfg.hidden})")
            heads = cfg.heads or cfg.hidden
        if heads and cfg.head_mode == "within" and g0 == 1:
            raise _ratio_error(p, "head_mode", "'within' keeps every key-value group, but the model has one query head per "
                                               "group: nothing to prune within a group; use head_mode: groups")
        scale = 1.0
        if cfg.budget is not None:
            scale = min(cfg.max_ratio / r for r in (cfg.depth, heads, cfg.mlp, 0 if tied else cfg.hidden) if r)
        return {"scale": scale, "depth": cfg.depth * scale, "heads": heads * scale, "mlp": cfg.mlp * scale,
                "hidden": (0 if tied else cfg.hidden) * scale}

    def _family(self) -> str:
        return getattr(hf_config(self.model), "model_type", "this model")

    def targets(self, frac: float, fine: Optional[float] = None) -> dict:
        """The sizes ``frac`` (0..1) of the way to the final ones; ``fine``: a separate share for the parts that
        move one neuron or channel at a time (MLP, hidden), which a budget's landing tunes last."""
        o, f = self.orig, self.final
        fine = frac if fine is None else fine
        g0 = o["heads"] // o["kv_heads"]

        def keep(n: int, r: float) -> int:
            return max(1, round(n * (1 - r)))

        if "scale" not in f:  # exact sizes: interpolate
            def at(k, x=frac):
                return max(1, round(o[k] - (o[k] - f[k]) * x))
            kv = at("kv_heads")
            gt = max(1, round(g0 - (g0 - f["heads"] // f["kv_heads"]) * frac))
            t = {"layers": at("layers"), "kv_heads": kv, "heads": kv * gt, "intermediate": at("intermediate", fine),
                 "hidden": at("hidden", fine)}
        else:
            r = f["heads"] * frac
            kv, gt = (keep(o["kv_heads"], r), g0) if self.cfg.head_mode == "groups" else (o["kv_heads"], keep(g0, r))
            def width(n: int, r: float) -> int:
                k, m = keep(n, r), self.cfg.multiple_of
                return k if k == n or m == 1 else min(n, max(m, k // m * m))

            t = {"layers": keep(o["layers"], f["depth"] * frac), "kv_heads": kv, "heads": kv * gt,
                 "intermediate": width(o["intermediate"], f["mlp"] * fine), "hidden": width(o["hidden"], f["hidden"] * fine)}
        if self.layout.cfg_head_dim is None:
            t["hidden"] = t["heads"] * o["head_dim"]
        return {**t, "head_dim": o["head_dim"]}

    # -- budgets ---------------------------------------------------------------------------------------------
    def count(self, sizes: dict) -> float:
        """The budget's measure (params, or MACs at the calibration length) of the model cut to ``sizes``:
        cut on a meta-device copy (shapes, no memory), so a landing can try many sizes."""
        m = copy.deepcopy(self._skeleton)
        apply_plan(m, self.layout, first_plan(self.orig, list(range(sizes["layers"])), sizes))
        if self.cfg.budget.kind == "macs":
            return float(decoder_macs(m, self.layout, int(_input_ids(self.data[0]).shape[-1])))
        return float(sum(p.numel() for p in m.parameters()))

    def _landing(self, frac: float) -> dict:
        """Sizes that meet the budget's share ``frac`` of the way from the unpruned count, by no more than one
        neuron or channel: the split's scale is bisected for the coarse parts (layers, heads) first, then the
        MLP and hidden sizes alone, so that whole layers and key-value groups cannot make it overshoot."""
        b = self.cfg.budget
        if self._base is None:
            self._base = self.count(self.orig)
        final = b.max if b.max is not None else self._base / b.reduction
        goal = self._base - (self._base - final) * frac

        def fits(s, u):
            return self.count(self.targets(s, u)) <= goal

        if not fits(1.0, 1.0):
            return self.targets(1.0)  # the split cannot go that far: as far as it goes (the stage reports it)
        lo, hi = 0.0, 1.0
        for _ in range(20):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if fits(mid, mid) else (mid, hi)
        s, lo = hi, 0.0
        for _ in range(20):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if fits(s, mid) else (mid, hi)
        return self.targets(s, hi)

    # -- the Pruner protocol -------------------------------------------------------------------------------
    def _ensure_scores(self) -> tuple[WidthScores, torch.Tensor]:
        if self.scores is None:
            width = self.cfg.importance.scores(self.model, self.layout, self.data)
            depth = layer_importance(self.model, self.layout, self.data, self.cfg.depth_importance) \
                if self.sizes["layers"] > self.final_layers() else torch.zeros(self.sizes["layers"])
            self.scores = (width, depth)
        return self.scores

    def final_layers(self) -> int:
        return self.targets(1.0)["layers"]

    def fork(self, model):
        self._ensure_scores()  # rank once on this model; every try of a bisection cuts by the same ranking
        return super().fork(model)

    def step(self, t, target):
        frac = min(target / self.cfg.sparsity if self.cfg.sparsity else 1.0, 1.0)
        goal = self.targets(frac) if self.cfg.budget is None else self._landing(frac)
        now = self.sizes
        goal = {k: min(v, now[k]) for k, v in goal.items()}  # never grow back what an earlier step cut
        if goal["heads"] // goal["kv_heads"] > now["heads"] // now["kv_heads"]:
            goal["heads"] = goal["kv_heads"] * (now["heads"] // now["kv_heads"])
        width, depth = self._ensure_scores()
        plan = make_plan(self.layout, now, width, depth, goal)
        self.sizes = apply_plan(self.model, self.layout, plan)
        self.scores = None
        return []

    def shared(self):
        return [self.data, self._skeleton]

    def step_facts(self):
        return {f"lm_{k}": v for k, v in self.sizes.items() if k != "head_dim"}

    def record(self, model, kept):
        self.model = model  # the stage's result (the unpruned copy when every step was undone), for summary()
        if not kept:
            return
        layers = [int(getattr(layer, "compress_layer_origin", i)) for i, layer in enumerate(self.layout.decoder_layers(model))]
        record_transform(model, "decoder_prune", sizes=dict(self.layout.sizes(hf_config(model))), layers=layers)

    def summary(self, kept_rows):
        sizes = self.layout.sizes(hf_config(self.model))
        return {"lm_sizes_before": dict(self.orig), "lm_sizes": dict(sizes), "importance": self.cfg.importance.method,
                "depth_importance": self.cfg.depth_importance}


# -- one call, for benchmarks and the Python API ------------------------------------------------------------

def prune_lm(model: nn.Module, cfg: DecoderPruneConfig | dict | None, calib_batches: Iterable) -> tuple[nn.Module, dict]:
    """Prune ``model`` (in place) once, Minitron-style, without fine-tuning; returns it and what changed.

    ``calib_batches``: input ids [batch, seq], dicts of named inputs, or ``(inputs, targets)`` tuples (all of
    them are used; MACs are counted at their sequence length). A ``budget`` (params or MACs) is landed as the
    prune stage lands it. Fine-tune afterwards, with KD from a copy of the unpruned model for Minitron's
    recipe: the prune stage does both (``prune: {method: decoder, ...}``).
    """
    from compress.stages.prune import _budget_met

    if not isinstance(cfg, DecoderPruneConfig):
        cfg = DecoderPruneConfig(**{**(cfg or {}), "method": "decoder"})
    cfg.check_rules("prune")
    batches = calibration_inputs(calib_batches)
    if not batches:
        raise RecipeError("prune.calibration_batches", "no calibration batches were given")
    pruner = DecoderPruner(cfg, model, batches)
    seq = int(_input_ids(batches[0]).shape[-1])
    before = {"params": sum(p.numel() for p in model.parameters()), "macs": decoder_macs(model, pruner.layout, seq)}
    pruner.step(1, cfg.sparsity)
    pruner.record(model, True)
    after = {"params": sum(p.numel() for p in model.parameters()), "macs": decoder_macs(model, pruner.layout, seq)}
    facts = {**pruner.summary([]), "unpruned_params": before["params"], "params": after["params"],
             "unpruned_macs": before["macs"], "macs": after["macs"],
             "layers_kept": [int(getattr(layer, "compress_layer_origin", i)) for i, layer in
                             enumerate(pruner.layout.decoder_layers(model))]}
    if cfg.budget is not None:
        facts["budget_met"] = _budget_met(cfg.budget, after[cfg.budget.kind], before[cfg.budget.kind])
    return model, facts


__all__ = ["ActivationImportance", "DecoderPruneConfig", "DecoderPruner", "DecoderSizes", "LM_IMPORTANCES",
           "LMImportanceConfig", "MagnitudeImportance", "Plan", "RandomImportance", "WidthScores", "apply_plan",
           "calibration_inputs", "decoder_macs", "layer_importance", "make_plan", "prune_lm", "register_lm_importance",
           "token_nll"]
