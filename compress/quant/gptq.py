"""GPTQ (Frantar et al. 2022): k-bit weights with group-wise scales, each column's rounding error spread onto
the columns not yet quantized through the inverse Hessian of the layer's inputs, so the layer's outputs
on calibration data move as little as possible. And what decoder LMs need around it: the decoder's
Linear layers (GPT-2's transformers ``Conv1D`` turned into ``nn.Linear`` first, replayed on reload).

Written by hand (about 60 lines): torchao 0.18's GPTQ (``torchao.prototype.gptq``) asserts a CUDA device
("GPTQ only supports CUDA currently") and its int4 weight-only tensors need the ``mslk`` kernel package
(``Int4WeightOnlyConfig`` on CPU: "Requires mslk >= 1.0.0"), both checked here with torchao 0.18.0 and
torch 2.14.1; GPTQModel and llm-compressor are GPU-first too. compress is CPU-first and its int4 layer is
its own packed ``QuantLayer`` (saved as a plain state_dict, reloaded by replaying transforms), so the
algorithm writes that layer's codes and scales directly.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn as nn

from compress.checkpoint import TRANSFORMS
from compress.data.inputs import to_device
from compress.quant.fake_quant import qrange


# -- which layers ---------------------------------------------------------------------------------------------
def _linear_of_conv1d(conv: nn.Module) -> nn.Linear:
    """transformers' ``Conv1D`` (``y = x W + b`` with ``W: [in, out]``) as the ``nn.Linear`` it computes."""
    n_in, n_out = conv.weight.shape
    lin = nn.Linear(n_in, n_out, bias=conv.bias is not None)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.t())
        if conv.bias is not None:
            lin.bias.copy_(conv.bias)
    return lin.to(conv.weight.device)


def conv1d_to_linear(model: nn.Module, names: Iterable[str]) -> list[str]:
    """Replace the named ``Conv1D`` modules by ``nn.Linear`` (same outputs); returns the names replaced."""
    done = []
    for name in names:
        m = model.get_submodule(name)
        if not isinstance(m, nn.Linear) and type(m).__name__ == "Conv1D":
            model.set_submodule(name, _linear_of_conv1d(m))
            done.append(name)
    return done


@TRANSFORMS.register("conv1d_to_linear")
def _replay_conv1d(model: nn.Module, params: dict, state_dict: dict) -> nn.Module:
    conv1d_to_linear(model, params["names"])
    return model


def decoder_linears(model: nn.Module, exclude: Iterable[str] = ()) -> Optional[list[str]]:
    """A decoder LM's projections (``DecoderLayout.linear_names``, not the LM head nor the embeddings) as
    ``nn.Linear`` (GPT-2's ``Conv1D`` converted, the conversion recorded for reloading); None for a model
    with no declared decoder layout."""
    from compress.checkpoint_io import record_transform
    from compress.models.decoder import decoder_layout

    layout = decoder_layout(model)
    if layout is None:
        return None
    names = [n for n in layout.linear_names(model) if n not in set(exclude)]
    converted = conv1d_to_linear(model, names)
    if converted:
        record_transform(model, "conv1d_to_linear", names=converted)
    return names


# -- the algorithm ----------------------------------------------------------------------------------------------
@torch.no_grad()
def hessians(model: nn.Module, names: list[str], batches: Iterable, device: torch.device) -> dict[str, torch.Tensor]:
    """``2/n X^T X`` of every named Linear's inputs over the calibration batches (n: input rows seen).

    All layers are observed in one pass of the float model (GPTQ's reference code quantizes layer after
    layer, each seeing its predecessors' quantized outputs; one pass is a common simplification that
    keeps this independent of the model's structure)."""
    H: dict[str, torch.Tensor] = {}
    seen: dict[str, int] = {}

    def hook(name):
        def fn(module, args, out):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            n = seen.get(name, 0)
            if name not in H:
                H[name] = torch.zeros(x.shape[1], x.shape[1], device=x.device)
            H[name].mul_(n / (n + x.shape[0])).add_(x.t() @ x, alpha=2.0 / (n + x.shape[0]))
            seen[name] = n + x.shape[0]
        return fn

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    was = model.training
    model.eval()
    try:
        for raw in batches:
            model(to_device(raw[0], device))
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return H


@torch.no_grad()
def gptq(weight: torch.Tensor, H: torch.Tensor, bits: int, group_size: int, damp: float = 0.01,
         block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed codes ``[out, in]`` (int32, in [-2^(b-1), 2^(b-1) - 1]) and scales ``[out, in / group]`` of a
    Linear weight, symmetric max-abs scales per group as compress's RTN uses (so only the rounding differs).

    The reference algorithm: damping ``damp * mean(diag H)``, the upper Cholesky factor of ``H^-1``, columns
    in order (no act-order), lazy batch updates ``block`` columns at a time; a group's scale is taken from
    the group's weights as updated when its first column is reached."""
    W = weight.detach().float().clone()
    rows, cols = W.shape
    g = group_size or cols
    qmin, qmax = qrange(bits, signed=True)
    H = H.clone().float()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(cols, device=H.device)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W, dtype=torch.int32)
    scales = torch.zeros(rows, cols // g, device=W.device)
    block = max(g, block - block % g)  # whole groups inside a block: a group's scale sees its updated weights
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            if (i1 + i) % g == 0:
                scale = (W1[:, i:i + g].abs().amax(dim=1) / max(qmax, 1)).clamp_min(1e-8)
                scales[:, (i1 + i) // g] = scale
            w, d = W1[:, i], Hinv1[i, i]
            q = torch.clamp(torch.round(w / scale), qmin, qmax)
            Q[:, i1 + i] = q.to(torch.int32)
            err = (w - q * scale) / d
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return Q, scales


def quantization_error(weight: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, H: torch.Tensor) -> float:
    """``tr((W - Q) H (W - Q)^T)``: the layer's output error on the calibration inputs GPTQ minimises."""
    g = weight.shape[1] // scales.shape[1]
    deq = (codes.float().view(codes.shape[0], -1, g) * scales.unsqueeze(-1)).view_as(weight)
    d = weight.detach().float() - deq
    return float(torch.trace(d @ H @ d.t()))
