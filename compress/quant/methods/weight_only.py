"""Weight-only k-bit: round the weights onto a per-channel grid, then (optionally) fine-tune, ``rounds`` times."""
from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from compress.quant.methods.base import QuantContext, register_method
from compress.quant.methods.torch_side import TorchSideOptions, quantize_layers
from compress.quant.qat import quant_layers


class WeightOnlyConfig(TorchSideOptions):
    """Per-channel k-bit weights (``bits: 8/4/2``), activations in float."""

    method: Literal["weight_only"] = "weight_only"
    rounds: int = Field(1, ge=1)  # round, then fine-tune, this many times
    DEFAULT_EPOCHS: ClassVar[int] = 0  # rounding alone unless finetune is given


def _round(model) -> None:
    for m in quant_layers(model):
        m.round_weight()


@register_method(WeightOnlyConfig, produces="packed")
def quantize_weight_only(model, cfg: WeightOnlyConfig, ctx: QuantContext):
    spec = {"kind": "int", "bits": cfg.weight_bits, "act_bits": 0, "act_mode": "ema", "momentum": 0.01,
            "learned_scale": False, "out_quant": False}
    return quantize_layers(model, cfg, ctx, spec, rounds=cfg.rounds, before_round=_round)
