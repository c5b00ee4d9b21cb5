"""What the PyTorch-side methods (QAT, weight-only, binary) share: wrap the Conv/Linear layers in
``QuantLayer``s, fine-tune through the shared trainer (optionally with KD), pack the weights."""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Optional

import torch.nn as nn
from pydantic import Field

from compress.errors import RecipeError
from compress.evaluation import evaluate
from compress.kd import KDConfig, kd_hook
from compress.quant.methods.base import QuantContext, QuantizeConfig
from compress.quant.qat import pack_layers, prepare_layers
from compress.trainer import OptimizerConfig, TrainConfig, Trainer


class QuantizeKDConfig(KDConfig):
    """Knowledge distillation while fine-tuning, through the distill stage's own hook."""

    alpha: float = Field(0.1, ge=0, le=1)  # weight of the hard-label loss, as in the distill stage


class TorchSideOptions(QuantizeConfig):
    """Options of the methods that quantize the PyTorch model's own layers."""

    fold_bn: bool = True
    keep_first_last: Optional[bool] = None  # default: true for binary, false otherwise
    exclude: list[str] = []  # layer names left in float
    # one scale per this many consecutive input weights of an output row (int4 LLM style); None: one per row
    group_size: Optional[int] = Field(None, ge=8)
    # decoder LMs: only the decoder layers' projections are quantized by default (not the LM head, which
    # holds a large share of a small LM's error, nor the embeddings, which are no Linear); true adds the head
    lm_head: bool = False
    finetune: Optional[TrainConfig] = None  # default: DEFAULT_EPOCHS epochs (Adam 5e-4, cosine)
    DEFAULT_EPOCHS: ClassVar[int] = 3

    def finetune_config(self) -> TrainConfig:
        if self.finetune is not None:
            return self.finetune
        return TrainConfig(epochs=self.DEFAULT_EPOCHS, optimizer=OptimizerConfig(lr=5e-4), scheduler={"name": "cosine"})

    def check_rules(self, path: str) -> None:
        if self.weight_bits == 1:
            raise RecipeError(f"{path}.bits", f"1-bit weights are method 'binary'; {self.method} takes 8, 4 or 2")
        if self.group_size is not None and self.method == "binary":
            raise RecipeError(f"{path}.group_size", "binary weights have one scale per channel; group_size is for 8/4/2 bits")


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
