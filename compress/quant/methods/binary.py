"""Binary networks: BinaryConnect (binary weights) or XNOR-Net (binary weights and inputs), hardtanh STE,
per-channel scales; first and last layer stay in float by default."""
from __future__ import annotations

from typing import Literal, Optional

from compress.quant.methods.base import QuantContext, register_method
from compress.quant.methods.torch_side import QuantizeKDConfig, TorchSideOptions, quantize_layers
from compress.quant.qat import ClipLatentWeights
from compress.errors import RecipeError


class BinaryConfig(TorchSideOptions):
    """1-bit weights (``binary: binaryconnect`` or ``xnor``), trained with latent float weights."""

    method: Literal["binary"] = "binary"
    binary: Literal["binaryconnect", "xnor"] = "binaryconnect"
    binary_scale: Literal["none", "layer", "channel"] = "channel"  # XNOR-Net uses per-channel mean|w|
    kd: Optional[QuantizeKDConfig] = None  # distil from the recipe's teacher while fine-tuning

    @property
    def weight_bits(self) -> int:
        return self.bits if self.bits is not None else 1

    def check_rules(self, path: str) -> None:
        if self.weight_bits != 1:
            raise RecipeError(f"{path}.bits", f"binary networks have 1-bit weights; expected 1, got {self.weight_bits}")


@register_method(BinaryConfig, produces="packed")
def quantize_binary(model, cfg: BinaryConfig, ctx: QuantContext):
    spec = {"kind": "binary", "bits": 1, "binary": cfg.binary, "scale_mode": cfg.binary_scale}
    model, metrics, facts = quantize_layers(model, cfg, ctx, spec, keep_first_last=True, hooks=(ClipLatentWeights,),
                                            kd=cfg.kd)
    facts["binary"] = cfg.binary
    return model, metrics, facts
