"""KernelNet layers and the item-based autoencoder recommender (Muller, Martel & Indiveri, ICML 2018).

Every input unit i and output unit j of a ``KernelLinear`` has a learned location (u_i, v_j in R^d);
the effective weight is ``W_ji * k(u_i, v_j)``. With the finite-support kernel
``k = max(0, 1 - ||u - v||^2)`` units whose locations drift apart are disconnected exactly, so the
layer learns its own sparsity pattern. No library ships this layer, hence the hand-written module.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Iterable, Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field, field_validator

from compress.checkpoint_io import TRANSFORMS, record_transform
from compress.config import Width
from compress.models.builtin import ACTIVATIONS, Activation
from compress.models.registry import ModelSpec, register_model
from compress.hooks import Hook

if TYPE_CHECKING:  # annotations only: models do not import the trainer
    from compress.trainer import Trainer

Kernel = Literal["finite", "gaussian", "none"]


def kernel_matrix(u: torch.Tensor, v: torch.Tensor, kind: str = "finite") -> torch.Tensor:
    """(out, in) kernel values between output locations ``v`` (out, d) and input locations ``u`` (in, d)."""
    # ||v||^2 + ||u||^2 - 2 v.u: one matmul instead of an (out, in, d) difference tensor (7x faster).
    d2 = (v.pow(2).sum(1, keepdim=True) + u.pow(2).sum(1) - 2.0 * v @ u.T).clamp_min(0.0)
    if kind == "finite":
        return (1.0 - d2).clamp_min(0.0)
    if kind == "gaussian":
        return torch.exp(-d2)
    raise ValueError(f"unknown kernel '{kind}'; expected 'finite' or 'gaussian'")


class KernelLinear(nn.Module):
    """``y = x (W * k(u, v))^T + b``; weight layout as ``nn.Linear`` (out, in)."""

    def __init__(self, in_features: int, out_features: int, dim: int = 5, kernel: str = "finite",
                 bias: bool = True, location_std: float = 1e-3):
        super().__init__()
        self.in_features, self.out_features, self.dim, self.kind = in_features, out_features, dim, kernel
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        # Locations start near the origin (std 1e-3, as the reference code): every kernel value starts near 1.
        self.u = nn.Parameter(torch.empty(in_features, dim))
        self.v = nn.Parameter(torch.empty(out_features, dim))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        nn.init.xavier_uniform_(self.weight)
        nn.init.trunc_normal_(self.u, std=location_std, a=-2 * location_std, b=2 * location_std)
        nn.init.trunc_normal_(self.v, std=location_std, a=-2 * location_std, b=2 * location_std)

    def kernel(self) -> torch.Tensor:
        return kernel_matrix(self.u, self.v, self.kind)

    def effective_weight(self) -> torch.Tensor:
        return self.weight * self.kernel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective_weight(), self.bias)

    def regularization(self, lambda_2: float, lambda_s: float) -> torch.Tensor:
        return lambda_2 * self.weight.pow(2).sum() + lambda_s * self.kernel().pow(2).sum()

    @torch.no_grad()
    def kernel_zeros(self) -> tuple[int, int]:
        """(zero kernel entries, all entries): connections the kernel has cut."""
        k = self.kernel()
        return int((k == 0).sum()), k.numel()

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the effective weight: cut connections become real zeros."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        lin.weight.copy_(self.effective_weight())
        if self.bias is not None:
            lin.bias.copy_(self.bias)
        return lin.to(self.weight.device)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, dim={self.dim}, kernel={self.kind}"


class Clip(nn.Module):
    """Clamp predictions to the rating range at evaluation only, so training gradients are never cut."""

    def __init__(self, low: float, high: float):
        super().__init__()
        self.low, self.high = float(low), float(high)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.training else x.clamp(self.low, self.high)

    def extra_repr(self) -> str:
        return f"low={self.low}, high={self.high}"


class KernelNetAutoencoder(nn.Sequential):
    """Item-based autoencoder: one item's ratings by all users in, the same users' predicted ratings out.

    Hidden layers use ``activation`` (sigmoid in the paper), the output layer is linear; layers are
    ``KernelLinear`` or, with ``kernel='none'``, ``nn.Linear`` (a dense AutoRec-style student).
    """

    def __init__(self, num_inputs: int, num_outputs: int, hidden: Iterable[int] = (500, 500), kernel: str = "finite",
                 dim: int = 5, activation: str = "sigmoid", lambda_2: float = 20.0, lambda_s: float = 0.006,
                 clip: Optional[tuple[float, float]] = (1.0, 5.0), output_kernel: bool = True):
        def layer(n_in, n_out, use_kernel=True):
            if kernel == "none" or not use_kernel:
                return nn.Linear(n_in, n_out)
            return KernelLinear(n_in, n_out, dim, kernel)

        mods: list[nn.Module] = []
        width = num_inputs
        for h in hidden:
            mods += [layer(width, h), ACTIVATIONS[activation]()]
            width = h
        mods.append(layer(width, num_outputs, output_kernel))
        if clip is not None:
            mods.append(Clip(*clip))
        super().__init__(*mods)
        self.lambda_2, self.lambda_s = lambda_2, lambda_s

    def regularization(self) -> torch.Tensor:
        """lambda_2 * sum ||W||^2 + lambda_s * sum ||k||^2 over layers (the paper's penalty, without its 1/2)."""
        total = torch.zeros((), device=next(self.parameters()).device)
        for m in self.modules():
            if isinstance(m, KernelLinear):
                total = total + m.regularization(self.lambda_2, self.lambda_s)
            elif isinstance(m, nn.Linear):
                total = total + self.lambda_2 * m.weight.pow(2).sum()
        return total

    def kernel_sparsity(self) -> Optional[float]:
        """Share of zero kernel entries over all kernel layers (None without kernel layers)."""
        zeros = total = 0
        for m in self.modules():
            if isinstance(m, KernelLinear):
                z, n = m.kernel_zeros()
                zeros, total = zeros + z, total + n
        return zeros / total if total else None

    def training_hooks(self) -> list[Hook]:
        """Hooks a trainer should add when it trains this model (see ``KernelRegularizer``)."""
        return [KernelRegularizer()]


def count_observed(data) -> int:
    """Observed (non-NaN) training targets: the N of the paper's summed loss."""
    ds = data.dataset("train")
    if hasattr(ds, "tensors"):
        return int((~torch.isnan(ds.tensors[1])).sum())
    return sum(int((~torch.isnan(b[1])).sum()) for b in data.loader("train", shuffle=False))


class KernelRegularizer(Hook):
    """Adds ``model.regularization() / N`` to the loss (N = observed training ratings).

    The paper minimises ``SSE/2 + reg/2``; the shared loss is the mean over observed ratings, so dividing
    the penalty by N keeps lambda_2 and lambda_s on the paper's scale. Only the first such hook of a
    trainer is active, so passing it explicitly and getting it from the model does not count it twice.
    """

    def on_fit_start(self, trainer: Trainer) -> None:
        first = next(h for h in trainer.hooks if isinstance(h, KernelRegularizer))
        self.active = first is self and hasattr(trainer.model, "regularization")
        self.scale = 1.0 / max(count_observed(trainer.data), 1)

    def loss(self, trainer, batch, outputs, loss):
        if not getattr(self, "active", False):
            return loss
        return loss + trainer.model.regularization() * self.scale


# -- baking kernels into plain Linear layers (for prune/quantize/export) ---------------------------------


def _replace_kernel_layers(model: nn.Module, make) -> int:
    n = 0
    for name, child in list(model.named_children()):
        if isinstance(child, KernelLinear):
            setattr(model, name, make(child))
            n += 1
        else:
            n += _replace_kernel_layers(child, make)
    return n


def bake_kernels(model: nn.Module) -> nn.Module:
    """Replace every KernelLinear by an nn.Linear holding ``W * k``: the zeros of the kernel become
    zero weights that pruning, quantization, ONNX export and non-zero counts see; locations are dropped."""
    if _replace_kernel_layers(model, lambda m: m.to_linear()):
        record_transform(model, "kernelnet_bake")
    return model


@TRANSFORMS.register("kernelnet_bake")
def _replay_bake(model: nn.Module, params: dict, state_dict: dict) -> nn.Module:
    _replace_kernel_layers(model, lambda m: nn.Linear(m.in_features, m.out_features, bias=m.bias is not None))
    return model


# -- registry ---------------------------------------------------------------------------------------------


class KernelNetSpec(ModelSpec):
    hidden: list[Width] = Field(default_factory=lambda: [500, 500], min_length=1)
    kernel: Kernel = "finite"
    dim: int = Field(5, ge=1, le=1024)  # location vector size
    activation: Activation = "sigmoid"
    lambda_2: float = Field(20.0, ge=0)  # GLocal-K's ML-100K values; KernelNet used 60 / 0.013 on ML-1M
    lambda_s: float = Field(0.006, ge=0)
    clip: Optional[tuple[float, float]] = (1.0, 5.0)  # rating range applied at evaluation; null for none
    output_kernel: bool = True

    @field_validator("clip")
    @classmethod
    def _ordered(cls, v):
        if v is not None and not v[0] < v[1]:
            raise ValueError(f"expected [low, high] with low < high, got {list(v)}")
        return v


class AutoencoderSpec(KernelNetSpec):
    kernel: Kernel = "none"


def _build(spec: KernelNetSpec, input_shape, num_outputs) -> nn.Module:
    return KernelNetAutoencoder(math.prod(input_shape), num_outputs, spec.hidden, spec.kernel, spec.dim,
                                spec.activation, spec.lambda_2, spec.lambda_s, spec.clip, spec.output_kernel)


register_model("kernelnet_autoencoder", config=KernelNetSpec,
               description="KernelNet item-based autoencoder recommender (kernelized sparse layers, ICML 2018)")(_build)
register_model("autoencoder", config=AutoencoderSpec,
               description="item-based rating autoencoder with dense layers (kernel: finite|gaussian for KernelNet)")(_build)
