"""Structured (channel/filter) pruning with torch-pruning: a genuinely smaller dense model.

torch-pruning's DependencyGraph finds the layers coupled to each channel (BN, the next conv, residual
adds) and its BasePruner removes whole channel groups ranked by a pluggable importance.
"""
from __future__ import annotations

import functools
import warnings
from typing import TYPE_CHECKING, Callable, Optional

import torch
import torch.nn as nn

if TYPE_CHECKING:
    import torch_pruning as tp

from compress.checkpoint import TRANSFORMS
from compress.registry import Registry

# name -> factory() -> a torch-pruning importance; add your own with @IMPORTANCES.register("name").
IMPORTANCES: Registry[Callable[[], tp.importance.Importance]] = Registry("importance")


@IMPORTANCES.register("l1", description="group L1 norm of the channel's weights")
def _l1():
    import torch_pruning as tp  # on use: it imports timm and torchvision (seconds a recipe check need not pay)

    return tp.importance.GroupMagnitudeImportance(p=1)


@IMPORTANCES.register("l2", description="group L2 norm of the channel's weights")
def _l2():
    import torch_pruning as tp

    return tp.importance.GroupMagnitudeImportance(p=2)


@IMPORTANCES.register("taylor", description="first-order Taylor |w * dL/dw| (Molchanov 2019); needs gradients",
                      needs_grad=True)
def _taylor():
    import torch_pruning as tp

    return tp.importance.GroupTaylorImportance()


@IMPORTANCES.register("bn_scale", description="|gamma| of the channel's BatchNorm (network slimming, Liu 2017)",
                      needs_bn=True)
def _bn_scale():
    import torch_pruning as tp

    return tp.importance.BNScaleImportance()


# -- transformers: whole attention heads and MLP widths ----------------------------------------------------
_HEAD_ATTRS = ("num_heads", "num_attention_heads")
_HEAD_DIM_ATTRS = ("head_dim", "attention_head_size")


def sync_attention_heads(model: nn.Module) -> None:
    """After heads were removed, set each attention module's head count from its q/k/v projection width
    (head size is kept: heads are pruned whole), and the adapter's record of it. Attention code reshapes
    with these attributes (timm: ``qkv.reshape(B, N, 3, self.num_heads, self.head_dim)``)."""
    from compress.models.adapter import adapter_of

    a = adapter_of(model)
    for name in list(a.num_heads):
        parent_name, _, leaf = name.rpartition(".")
        try:
            parent, proj = model.get_submodule(parent_name), model.get_submodule(name)
        except AttributeError:
            continue
        head_dim = next((getattr(parent, k) for k in _HEAD_DIM_ATTRS if isinstance(getattr(parent, k, None), int)), None)
        if not head_dim:
            continue
        width = proj.weight.shape[0] // (3 if leaf == "qkv" else 1)
        heads = width // head_dim
        for k in _HEAD_ATTRS:
            if isinstance(getattr(parent, k, None), int):
                setattr(parent, k, heads)
        for k in ("all_head_size", "attn_dim"):  # transformers' BERT, timm's Attention
            if isinstance(getattr(parent, k, None), int):
                setattr(parent, k, width)
        a.num_heads[name] = heads


def transformer_ignored(model: nn.Module) -> list[nn.Module]:
    """Layers whose outputs set a transformer's residual width (embeddings, the patch embedding): kept,
    so that only attention heads and MLP hidden widths are pruned.

    ``nn.MultiheadAttention`` (torchvision's ViT) is kept whole: torch's module fixes its q/k/v width to
    the residual width, so its heads cannot go without replacing the module; its MLPs are pruned. Every
    layer that writes that width is kept too: torch-pruning's graph loses the residual stream at the
    class-token concat, so keeping the patch embedding alone would not keep the width.
    """
    from compress.models.adapter import adapter_of

    a = adapter_of(model)
    mha = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    if not a.num_heads and not mha:
        return []
    out = [m for m in model.modules() if isinstance(m, nn.Embedding)] + mha
    widths = {m.embed_dim for m in mha}
    out += [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features in widths
            or isinstance(m, nn.modules.conv._ConvNd) and m.out_channels in widths]
    first = model.get_submodule(a.first_layer) if a.first_layer else None
    if isinstance(first, nn.modules.conv._ConvNd):  # a patch embedding (text models start at nn.Embedding)
        out.append(first)
    return out


@functools.cache
def _pruner_class():
    """torch-pruning's BasePruner, specialised; built on first use (importing torch-pruning takes seconds)."""
    import torch_pruning as tp

    class _Pruner(tp.pruner.BasePruner):
        """BasePruner whose step also updates the attention modules' head counts."""

        def step(self, interactive: bool = False):
            out = super().step(interactive)
            sync_attention_heads(self.model)
            return out

        def _round_to(self, n_pruned: int, current_channels: int, round_to: int) -> int:
            """torch-pruning rounds the kept count down to a multiple of ``round_to``; below one multiple that asks
            for every channel, and the layer is then left unpruned (6 channels, round_to 8: never pruned). Keep at
            least one multiple, and prune layers narrower than ``round_to`` by the plain count: no multiple fits them."""
            if current_channels < round_to:
                return n_pruned
            keep = max(round_to, (current_channels - n_pruned) // round_to * round_to)
            return current_channels - keep

        def get_target_head_pruning_ratio(self, module) -> float:
            """This step's share of the *current* heads. torch-pruning's layer scope removes ceil(ratio x current
            heads) with the schedule's cumulative ratio, so iterative steps overshoot (3 heads, 3 steps of 0.1,
            0.2, 0.3: none left, then a division by zero); the cumulative target is of the initial heads."""
            target = super().get_target_head_pruning_ratio(module)
            init, now = self.init_num_heads.get(module), self.num_heads.get(module)
            if self.global_pruning or not init or not now:
                return target
            remove = now - max(1, round(init * (1 - target)))
            return 0.0 if remove <= 0 else (remove - 0.5) / now  # torch-pruning takes ceil(ratio * now) = remove

    return _Pruner


def build_pruner(model: nn.Module, example: torch.Tensor, importance: str, ratio: float, steps: int,
                 scheduler: Callable, *, global_pruning: bool, ignored: list[nn.Module],
                 layer_ratios: Optional[dict[nn.Module, float]] = None, round_to: Optional[int] = None,
                 max_layer_ratio: float = 0.9) -> tp.pruner.BasePruner:
    """A torch-pruning pruner; for models whose adapter declares attention heads, whole heads (at the same
    ratio) and MLP widths go, the residual width stays (``transformer_ignored``)."""
    from compress.models.adapter import attention_heads

    heads = attention_heads(model)
    extra = dict(num_heads=heads, prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=ratio) if heads else {}
    with warnings.catch_warnings():
        # torch-pruning warns about every parameter outside a layer (a ViT's pos_embed and cls_token, a
        # ConvNeXt's layer scale) that it prunes along its last non-singleton axis: that axis is the channel
        # (or residual) width those parameters follow, so the warning tells a user nothing to act on.
        warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
        return _pruner_class()(
            model, example, importance=IMPORTANCES.get(importance).obj(), global_pruning=global_pruning,
            pruning_ratio=ratio, pruning_ratio_dict=layer_ratios or None, max_pruning_ratio=max_layer_ratio,
            iterative_steps=steps, iterative_pruning_ratio_scheduler=scheduler,
            ignored_layers=list(ignored) + transformer_ignored(model), round_to=round_to, **extra)


def accumulate_grads(model: nn.Module, data, batches: int = 4, device: str | torch.device = "cpu") -> None:
    """Fill ``.grad`` from a few training batches, for gradient-based importance (Taylor)."""
    from compress.data.inputs import to_device
    from compress.metrics import LOSSES, default_loss

    loss_fn = LOSSES[default_loss(data.task)]
    model.train().to(device)
    model.zero_grad(set_to_none=True)
    for i, (x, y, *_) in enumerate(data.loader("train", shuffle=False)):
        if i >= batches:
            break
        loss_fn(model(to_device(x, device)), y.to(device)).backward()


def _resize(module: nn.Module, prefix: str, shapes: dict) -> None:
    """Give ``module``'s own parameters/buffers the pruned shapes (values come later)."""
    for store in (module._parameters, module._buffers):
        for key, t in list(store.items()):
            saved = shapes.get(f"{prefix}{key}")
            if t is None or saved is None or tuple(saved) == tuple(t.shape):
                continue
            new = torch.empty(tuple(saved), dtype=t.dtype, device=t.device)
            store[key] = nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new
    if isinstance(module, nn.modules.conv._ConvNd):
        w = module.weight
        depthwise = module.groups > 1 and module.groups == module.in_channels
        # ConvTranspose stores (in, out/groups, ...), Conv stores (out, in/groups, ...).
        a, b = w.shape[0], w.shape[1]
        if module.transposed:
            module.in_channels, module.out_channels = a, b * module.groups
        else:
            module.out_channels = a
            if depthwise:
                module.groups = a
            module.in_channels = b * module.groups
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, nn.modules.batchnorm._BatchNorm):
        ref = module.weight if module.weight is not None else module.running_mean
        module.num_features = ref.shape[0]
    elif isinstance(module, nn.GroupNorm):
        module.num_channels = module.weight.shape[0]
    elif isinstance(module, nn.LayerNorm) and module.weight is not None:
        module.normalized_shape = tuple(module.weight.shape)


@TRANSFORMS.register("channel_prune", description="resize Conv/Linear/norm layers to a structurally pruned checkpoint")
def replay_channel_prune(model: nn.Module, params: dict, state_dict: dict) -> nn.Module:
    # Shapes alone rebuild the pruned architecture: channel pruning changes widths, never the graph.
    # They are recorded at pruning time, because later stages (QAT wrappers, packing) rename the saved keys.
    shapes = params.get("shapes") or {k: tuple(v.shape) for k, v in state_dict.items()}
    for name, module in model.named_modules():
        _resize(module, f"{name}." if name else "", shapes)
    sync_attention_heads(model)
    return model


def pruned_shapes(model: nn.Module) -> dict[str, list[int]]:
    """The transform's record: every tensor's shape after pruning."""
    return {k: list(v.shape) for k, v in model.state_dict().items()}
