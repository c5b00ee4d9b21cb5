"""What the PyTorch-side methods (QAT, weight-only, binary) share: wrap the Conv/Linear layers in
``QuantLayer``s, fine-tune through the shared trainer (optionally with KD), pack the weights."""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Optional

import torch.nn as nn
from pydantic import Field

from compress.checkpoint_io import record_transform
from compress.errors import RecipeError
from compress.evaluation import evaluate
from compress.kd import KDConfig, kd_hook
from compress.quant.methods.base import QuantContext, QuantizeConfig
from compress.quant.qat import fold_batchnorm, pack_model, quant_layers, quantizable_names, wrap
from compress.trainer import OptimizerConfig, TrainConfig, Trainer


class QuantizeKDConfig(KDConfig):
    """Knowledge distillation while fine-tuning, through the distill stage's own hook."""

    alpha: float = Field(0.1, ge=0, le=1)  # weight of the hard-label loss, as in the distill stage


class TorchSideOptions(QuantizeConfig):
    """Options of the methods that quantize the PyTorch model's own layers."""

    fold_bn: bool = True
    keep_first_last: Optional[bool] = None  # default: true for binary, false otherwise
    exclude: list[str] = []  # layer names left in float
    finetune: Optional[TrainConfig] = None  # default: DEFAULT_EPOCHS epochs (Adam 5e-4, cosine)
    DEFAULT_EPOCHS: ClassVar[int] = 3

    def finetune_config(self) -> TrainConfig:
        if self.finetune is not None:
            return self.finetune
        return TrainConfig(epochs=self.DEFAULT_EPOCHS, optimizer=OptimizerConfig(lr=5e-4), scheduler={"name": "cosine"})

    def check_rules(self, path: str) -> None:
        if self.weight_bits == 1:
            raise RecipeError(f"{path}.bits", f"1-bit weights are method 'binary'; {self.method} takes 8, 4 or 2")


def sizes(model: nn.Module) -> dict:
    """Bytes of the weights of the quantized layers as stored, against the same weights in fp32."""
    stored = fp32 = 0
    for m in quant_layers(model):
        n = 1
        for d in m.weight_shape:
            n *= d
        fp32 += 4 * n
        stored += m.weight_packed.numel() + 4 * m.weight_scale.numel() if m.packed else 4 * n
    for name, p in model.named_parameters():  # layers left in float (first/last, excluded)
        if name.endswith("weight") and p.ndim > 1:
            fp32 += 4 * p.numel()
            stored += 4 * p.numel()
    return {"weight_bytes": stored, "fp32_weight_bytes": fp32, "weight_compression": round(fp32 / max(stored, 1), 2)}


def prepare_layers(model: nn.Module, cfg: TorchSideOptions, spec: dict, path: str, *, keep_first_last: bool = False,
                   calibration=None, calibrate_batches: int = 0) -> tuple[dict, dict]:
    """Fold BatchNorm, wrap the Conv/Linear layers in ``QuantLayer``s, calibrate activation ranges on
    ``calibration`` (batches of a loader); (the wrapped layers' specs, facts). The stage and
    ``compress.quant.qat.prepare`` start here."""
    from compress.quant.qat import calibrate

    facts: dict = {"method": cfg.method, "bits": cfg.weight_bits}
    if cfg.fold_bn:
        pairs = fold_batchnorm(model)
        if pairs:
            record_transform(model, "fold_bn", pairs=pairs)
            facts["folded_bn"] = len(pairs)
    keep = cfg.keep_first_last if cfg.keep_first_last is not None else keep_first_last
    names = quantizable_names(model, keep, cfg.exclude)
    missing = [n for n in cfg.exclude if n not in dict(model.named_modules())]
    if missing:
        raise RecipeError(f"{path}.exclude", f"no layer named {missing[0]!r} in the model")
    if not names:
        raise RecipeError(path, "the model has no Conv/Linear layer left to quantize")
    layers = {n: spec for n in names}
    wrap(model, layers)
    if spec.get("act_bits"):
        facts["activation_bits"] = spec["act_bits"]
        if calibration is not None and calibrate_batches:
            calibrate(model, calibration, calibrate_batches)
    return layers, facts


def pack_layers(model: nn.Module, cfg: TorchSideOptions, layers: dict, facts: dict) -> dict:
    """After training: eval mode, weights packed, the wrapping recorded for reload; the facts with sizes."""
    model.eval()
    pack_model(model)
    record_transform(model, cfg.method, layers=layers, bits=cfg.weight_bits)
    return {**facts, **sizes(model), "quantized_layers": len(layers)}


def quantize_layers(model: nn.Module, cfg: TorchSideOptions, ctx: QuantContext, spec: dict, *,
                    keep_first_last: bool = False, hooks: tuple = (), kd: Optional[QuantizeKDConfig] = None,
                    rounds: int = 1, before_round=None, calibrate_batches: int = 0) -> tuple[nn.Module, dict, dict]:
    """Wrap, fine-tune (``rounds`` times, ``before_round(model)`` first), pack; (model, metrics, facts)."""
    finetune = cfg.finetune_config()
    loader = ctx.data.loader("train", shuffle=True, batch_size=finetune.batch_size) if spec.get("act_bits") else None
    layers, facts = prepare_layers(model, cfg, spec, ctx.path, keep_first_last=keep_first_last, calibration=loader,
                                   calibrate_batches=calibrate_batches)
    hooks = [h(model) for h in hooks]
    if kd is not None:
        if ctx.teacher is None:
            raise RecipeError(f"{ctx.path}.kd", "needs a teacher model (pass teacher=... or add 'teacher:' to the recipe)")
        hooks.append(kd_hook(model, ctx.teacher, kd, ctx.data, path=f"{ctx.path}.kd", teacher_path=f"{ctx.path}.kd",
                             device=finetune.device))
    try:
        for r in range(rounds):
            if before_round is not None:
                before_round(model)
            if finetune.epochs > 0:
                kw = dict(ctx.trainer_kwargs)
                if rounds > 1 and kw.get("state_path") is not None:
                    kw["state_path"] = Path(kw["state_path"]).with_name(f"trainer_state_round{r}.pt")
                Trainer(model, finetune, ctx.data, hooks, **kw).fit()
    finally:
        for h in hooks:
            if hasattr(h, "close"):
                h.close()
    facts = pack_layers(model, cfg, layers, facts)
    return model, evaluate(model, ctx.data, ctx.split), facts
