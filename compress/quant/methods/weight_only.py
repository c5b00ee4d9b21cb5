"""Weight-only k-bit: round the weights onto a per-channel (or per-group) grid, then (optionally) fine-tune,
``rounds`` times (``weight_only``: round to nearest, RTN); or GPTQ's error-compensating rounding on calibration
data (``gptq``), for decoder LMs and any model with Linear layers."""
from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from compress.checkpoint_io import record_transform
from compress.errors import RecipeError
from compress.evaluation import evaluate
from compress.quant.methods.base import QuantContext, register_method
from compress.quant.methods.torch_side import TorchSideOptions, quantize_layers
from compress.quant.qat import layer_names, quant_layers, sizes, wrap


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


class GPTQConfig(TorchSideOptions):
    """GPTQ weight-only k-bit (``bits: 4`` and ``group_size: 128`` as int4 LLM checkpoints use): each layer's
    rounding error compensated through its calibration inputs' Hessian (``compress.quant.gptq``)."""

    method: Literal["gptq"] = "gptq"
    bits: int = 4
    group_size: int = Field(128, ge=8)
    calibration_batches: int = Field(16, ge=1)  # training-split batches whose layer inputs make the Hessians
    damp: float = Field(0.01, gt=0, le=1)  # share of the Hessian's mean diagonal added before inverting it
    DEFAULT_EPOCHS: ClassVar[int] = 0  # the rounding is the method: no fine-tuning

    def check_rules(self, path: str) -> None:
        super().check_rules(path)
        if self.weight_bits not in (8, 4, 2):
            raise RecipeError(f"{path}.bits", f"gptq takes 8, 4 or 2 bits, got {self.weight_bits}")
        if self.finetune is not None and self.finetune.epochs:
            raise RecipeError(f"{path}.finetune", "gptq writes packed weights: fine-tune before it (a train stage, or "
                                                  "method: qat)")


@register_method(GPTQConfig, produces="packed")
def quantize_gptq(model, cfg: GPTQConfig, ctx: QuantContext):
    from compress.quant.gptq import gptq, hessians, quantization_error
    from compress.quant.packing import pack
    from compress.quant.fake_quant import qrange
    from compress.utils import resolve_device

    names = layer_names(model, cfg, False, ctx.path)
    if not names:
        raise RecipeError(ctx.path, "the model has no Linear layer to quantize")
    device = resolve_device(cfg.finetune_config().device)
    model.to(device)
    loader = ctx.data.loader("train", shuffle=False)
    batches = [b for _, b in zip(range(cfg.calibration_batches), loader)]
    H = hessians(model, names, batches, device)
    spec = {"kind": "int", "bits": cfg.weight_bits, "act_bits": 0, "act_mode": "ema", "momentum": 0.01,
            "learned_scale": False, "out_quant": False, "group_size": cfg.group_size}
    layers = {n: spec for n in names}
    qmin = qrange(cfg.weight_bits, signed=True)[0]
    errors = {}
    for n in names:
        w = model.get_submodule(n).weight
        codes, scales = gptq(w, H[n], cfg.weight_bits, cfg.group_size, cfg.damp)
        errors[n] = quantization_error(w, codes, scales, H[n])
        wrap(model, {n: spec})
        layer = model.get_submodule(n)
        layer._make_packed(pack(codes - qmin, cfg.weight_bits), scales.reshape(-1).float())
    del H
    model.eval()
    record_transform(model, "weight_only", layers=layers, bits=cfg.weight_bits)
    facts = {"method": "gptq", "bits": cfg.weight_bits, "group_size": cfg.group_size, "quantized_layers": len(names),
             "calibration_batches": len(batches), "gptq_output_error": round(sum(errors.values()), 6), **sizes(model)}
    return model, evaluate(model, ctx.data, ctx.split), facts
