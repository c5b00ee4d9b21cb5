"""Quantization methods: one config class per method, registered by name, each with one handler.

``QuantizeConfig(method="qat", bits=4)`` (or a recipe's ``quantize: {method: qat, bits: 4}``) builds the
registered class of that method; ``compress.quantize`` calls the handler registered for its type. A new
method (or backend) is one new module: a config class and a handler under ``@register_method``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Literal, Optional, Union

import torch.nn as nn
from pydantic import Field, field_validator

from compress.config import MethodConfig, StrictModel
from compress.errors import CompressError, RecipeError
from compress.quant import int8
from compress.registry import Registry

# method name -> config class; the entry's ``handler`` and ``produces`` say what it runs and hands on.
QUANT_METHODS: Registry = Registry("quantization method")


@dataclass
class QuantContext:
    """What a handler gets besides the model and its config."""

    data: object
    out_dir: Path
    split: str  # where the returned metrics are measured
    path: str = "quantize"  # the recipe key path errors name
    teacher: Optional[nn.Module] = None
    trainer_kwargs: dict = field(default_factory=lambda: {"name": "quantize"})
    artifact: Optional[Path] = None  # an .onnx file's int8 result (default: out_dir/<stem>_int8.onnx)
    benchmark: object = None  # an .onnx file: the BenchmarkConfig of its latency comparison (None: defaults)


# handler(model, config, ctx) -> (model or OrtModel, task metrics, facts for the report); a file handler
# gets the path of a float .onnx file instead of the model, and ctx.data as the user gave it.
Handler = Callable[[nn.Module, "QuantizeConfig", QuantContext], tuple]


class QuantizeConfig(MethodConfig):
    """The ``quantize`` stage's options; ``method`` picks the concrete class (see ``QUANT_METHODS``)."""

    METHODS: ClassVar[Registry] = QUANT_METHODS
    DEFAULT: ClassVar[str] = "ptq_static"
    method: str = "ptq_static"
    bits: Optional[int] = None  # weights: 8 (default), 4 or 2; binary is 1, ONNX PTQ is 8

    @field_validator("bits")
    @classmethod
    def _bits(cls, v):
        if v is not None and v not in (1, 2, 4, 8):
            raise ValueError(f"expected one of 1, 2, 4, 8, got {v!r}")
        return v

    @property
    def weight_bits(self) -> int:
        return self.bits if self.bits is not None else 8

    def check_rules(self, path: str) -> None:
        """Cross-key rules, shared by the recipe check and the Python entry point."""


def register_method(config: type[QuantizeConfig], *, produces: str, description: str = "",
                    onnx_file: Optional[Handler] = None):
    """Register ``config``'s method (its ``method`` default) with the decorated handler.

    ``produces``: the model kind the stage hands on ("onnx", "fakequant", "packed"; see stages.base).
    ``onnx_file``: the handler for a float ``.onnx`` file the user already has (methods that quantize ONNX).
    """
    name = config.model_fields["method"].default

    def deco(handler: Handler) -> Handler:
        QUANT_METHODS.register(name, config=config, description=description or (config.__doc__ or "").strip(),
                               handler=handler, produces=produces, onnx_file=onnx_file)(config)
        return handler

    return deco


def handler_for(cfg: QuantizeConfig) -> Handler:
    return QUANT_METHODS.get(cfg.method).extra["handler"]


def file_handler_for(cfg: QuantizeConfig, path: str) -> Handler:
    """The handler of ``cfg``'s method for an existing .onnx file; one line naming those that have one."""
    handler = QUANT_METHODS.get(cfg.method).extra.get("onnx_file")
    if handler is None:
        takes = [e.name for e in QUANT_METHODS if e.extra.get("onnx_file")]
        raise RecipeError(f"{path}.method", f"{cfg.method} quantizes a PyTorch model; an .onnx file takes "
                                            f"{' or '.join(takes)}")
    return handler


def data_bundle(source):
    """A file handler's data as the user gave it: a DataBundle, a dataset name, a data block (dict) or loaders."""
    from compress.api import as_data
    from compress.data import create_data

    return create_data(source) if isinstance(source, dict) else as_data(source)


# -- option blocks shared by several methods -----------------------------------------------------------

class Int8CheckConfig(StrictModel):
    """int8 file vs its float reference on the validation split, on the machine that makes it."""

    batches: int = Field(4, ge=1)
    max_rel_diff: float = Field(0.25, gt=0)  # largest |int8 - float| as a share of the largest |float output|
    # classification: predicted classes that agree (an untrained model's near-tied logits flip more often)
    min_top1_agreement: float = Field(0.9, ge=0, le=1)
    # int8 kernels vs ORT's float simulation of the same file: requantization rounding only
    max_kernel_diff: float = Field(0.05, gt=0)


class Int8FileOptions(QuantizeConfig):
    """Methods that write an int8 ONNX file (PTQ, 8-bit QAT): its format and the check it must pass."""

    per_channel: bool = True  # ONNX PTQ weights (QAT scales are always per channel)
    activation_type: Literal["uint8", "int8"] = "uint8"
    # The CPU the file must be right on. any: every x86 CPU (7-bit weights keep ORT's fast U8S8 kernels
    # from saturating where there is no VNNI); vnni: full 8-bit weights, only for CPUs with VNNI/AMX;
    # native: what this machine needs. See compress/quant/int8.py.
    target_cpu: Literal["any", "vnni", "native"] = "any"
    weight_type: Literal["auto", "int8", "uint8"] = "auto"  # uint8: U8U8 kernels (never saturate, slower)
    reduce_range: Union[bool, Literal["auto"]] = "auto"  # 7-bit int8 weights (ORT's reduce_range)
    check: Int8CheckConfig = Int8CheckConfig()
    opset: int = Field(17, ge=13)

    def int8_format(self, path: str = "quantize") -> int8.Int8Format:
        return int8.resolve_format(self.weight_type, self.reduce_range, self.target_cpu, self.activation_type,
                                   self.per_channel, path)


def check_int8_file(path: Path, reference, data, cfg: Int8FileOptions, fmt: int8.Int8Format, where: str) -> dict:
    """Check an int8 file against its float reference on validation inputs; a failing file is set aside."""
    split = "val" if data.has("val") else "test"
    result = int8.check_int8(path, reference, data, split=split, batches=cfg.check.batches)
    problem = int8.verdict(result, max_rel_diff=cfg.check.max_rel_diff, min_top1_agreement=cfg.check.min_top1_agreement,
                           max_kernel_diff=cfg.check.max_kernel_diff)
    if problem:
        rejected = path.with_suffix(".rejected.onnx")
        path.replace(rejected)
        raise CompressError(f"{where}: {problem}; the file was not kept (see {rejected})")
    return {**result.as_dict(), "format": fmt.words(), "target_cpu": cfg.target_cpu}


def needs_bits(cfg: QuantizeConfig, path: str, allowed: tuple[int, ...], why: str) -> None:
    if cfg.weight_bits not in allowed:
        raise RecipeError(f"{path}.bits", f"{why}; expected {' or '.join(map(str, allowed))}, got {cfg.weight_bits}")
