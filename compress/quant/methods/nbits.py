"""Weight-only int4/int8 ONNX files of a causal LM (``nbits``: ORT's MatMulNBits) and int8 dynamic MatMuls
(``lm_dynamic``, the baseline), each checked by the perplexity of the file itself on validation token blocks:
top-1 agreement of near-tied next-token logits says little about a language model."""
from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Literal, Optional

import numpy as np
from pydantic import Field

from compress.config import StrictModel
from compress.errors import CompressError, RecipeError
from compress.quant import nbits_onnx
from compress.quant.methods.base import QuantContext, QuantizeConfig, data_bundle, needs_bits, register_method
from compress.runtime.generate import lm_blocks


class LMBlocksConfig(StrictModel):
    blocks: int = Field(16, ge=1)  # token blocks of the data's blocks (block_size tokens each)


class PerplexityCheckConfig(LMBlocksConfig):
    """The quantized file's perplexity on validation blocks against the float file's, on the same blocks."""

    max_ratio: float = Field(1.10, ge=1)  # quantized / float perplexity above this: the file is set aside


class LMFileOptions(QuantizeConfig):
    """Methods that write a language model's quantized ONNX file with a cache."""

    lm_head: bool = False  # quantize the LM head's MatMul too (it is the largest matrix of a small-vocab LM)
    check: PerplexityCheckConfig = PerplexityCheckConfig()
    opset: int = Field(17, ge=14)


class NBitsConfig(LMFileOptions):
    """Weight-only int4 (or int8) MatMuls in blocks (ONNX Runtime's MatMulNBits); activations stay float."""

    method: Literal["nbits"] = "nbits"
    algorithm: Literal["default", "rtn", "k_quant", "gptq", "hqq"] = "default"
    block_size: Literal[16, 32, 64, 128, 256] = 32  # input channels per scale
    symmetric: bool = False  # default algorithm: no zero points
    # MatMulNBits' compute type: 4 multiplies int8-quantized activations (fastest on x86, as ORT GenAI's
    # builder does on CPUs); 0/None: ORT's default (float).
    accuracy_level: Optional[Literal[0, 1, 2, 3, 4]] = 4
    embeddings: bool = False  # the token embedding as GatherBlockQuantized (4 bits, default algorithm)
    # ONNX Runtime's transformer optimizer on the quantized graph: norms fused with their residual Add; float-exact,
    # int4 decode 1.04-1.16x in four interleaved runs on a busy 2-core machine: opt-in until measured on a quiet one
    # (docs/lm-deploy.md, benchmarks/lm_fusion.py)
    fuse: bool = False
    calibration: LMBlocksConfig = LMBlocksConfig()  # GPTQ's training-split blocks

    @property
    def weight_bits(self) -> int:
        return self.bits if self.bits is not None else 4

    def check_rules(self, path: str) -> None:
        needs_bits(self, path, (4, 8), "ONNX Runtime's MatMulNBits writes 4- or 8-bit weights here")
        if self.weight_bits != 4 and self.algorithm in nbits_onnx.FOUR_BIT_ONLY:
            raise RecipeError(f"{path}.algorithm", f"{self.algorithm} writes 4-bit weights only; expected "
                                                   f"algorithm: default for {self.weight_bits} bits")
        if self.embeddings and (self.weight_bits != 4 or self.algorithm != "default"):
            raise RecipeError(f"{path}.embeddings", "quantized embeddings need bits: 4 and algorithm: default")


class LMDynamicConfig(LMFileOptions):
    """int8 weights and dynamically quantized activations for every MatMul (ORT quantize_dynamic)."""

    method: Literal["lm_dynamic"] = "lm_dynamic"
    target_cpu: Literal["any", "vnni", "native"] = "any"  # as ptq_dynamic: 7-bit weights unless VNNI

    def check_rules(self, path: str) -> None:
        needs_bits(self, path, (8,), "int8 dynamic quantization writes 8-bit weights")


def _split(data, *names: str) -> str:
    has = (lambda s: s in data) if isinstance(data, dict) else (lambda s: data.has(s))
    for s in names:
        if has(s):
            return s
    return names[-1]


def quantize_lm_file(src: Path, cfg: LMFileOptions, ctx: QuantContext) -> tuple[Path, dict, dict]:
    """Quantize the float LM file ``src``, check its perplexity against ``src`` on validation blocks (a file that
    fails is renamed ``.rejected.onnx``) and measure both on ``ctx.split``; (file, metrics, facts)."""
    from compress.runtime.generate import onnx_perplexity
    from compress.runtime.lm_export import OrtLM

    OrtLM(src)  # one line for a file without a cache, before any work
    bits = cfg.weight_bits
    tag = f"int{bits}_{cfg.algorithm}" if isinstance(cfg, NBitsConfig) else "int8_dynamic"
    out = ctx.artifact or ctx.out_dir / f"{src.stem}_{tag}.onnx"
    facts: dict = {"method": cfg.method, "bits": bits, "lm_head": cfg.lm_head}
    if isinstance(cfg, NBitsConfig):
        cal = None
        if cfg.algorithm == "gptq":
            cal = lm_blocks(ctx.data, _split(ctx.data, "train", "val"), cfg.calibration.blocks, f"{ctx.path}.calibration")
            facts["calibration_blocks"] = len(cal)
        nbits_onnx.quantize_nbits(src, out, bits=bits, block_size=cfg.block_size, algorithm=cfg.algorithm,
                                  symmetric=cfg.symmetric, accuracy_level=cfg.accuracy_level or None,
                                  lm_head=cfg.lm_head, embeddings=cfg.embeddings, calibration=cal, fuse=cfg.fuse)
        facts.update(algorithm=cfg.algorithm, block_size=cfg.block_size, embeddings=cfg.embeddings, fuse=cfg.fuse)
    else:
        nbits_onnx.quantize_lm_dynamic(src, out, lm_head=cfg.lm_head, target_cpu=cfg.target_cpu)
    val = lm_blocks(ctx.data, _split(ctx.data, "val", "test"), cfg.check.blocks, f"{ctx.path}.check")
    ref, got = onnx_perplexity(src, val), onnx_perplexity(out, val)
    ratio = got / ref
    check = {"float_perplexity": round(ref, 4), "perplexity": round(got, 4), "ratio": round(ratio, 4),
             "blocks": len(val), "max_ratio": cfg.check.max_ratio}
    if not math.isfinite(ratio) or ratio > cfg.check.max_ratio:
        rejected = out.with_suffix(".rejected.onnx")
        out.replace(rejected)
        raise CompressError(f"{ctx.path}: perplexity {got:.3f} is {ratio:.3f}x the float file's {ref:.3f} on "
                            f"{len(val)} validation blocks (check.max_ratio {cfg.check.max_ratio}); the file was not "
                            f"kept (see {rejected})")
    test = lm_blocks(ctx.data, ctx.split, 10 ** 9, ctx.path) if ctx.split in ("test", "val") else val
    metrics = {"perplexity": onnx_perplexity(out, test)}
    facts.update({"artifact": str(out), "fp32_onnx": str(src), "fp32_onnx_bytes": src.stat().st_size,
                  "quantized_onnx_bytes": out.stat().st_size,
                  "size_ratio": round(src.stat().st_size / out.stat().st_size, 2), "perplexity_check": check,
                  "fp32_onnx_metrics": {"perplexity": onnx_perplexity(src, test)}, "ops": nbits_onnx.nbits_ops(out)})
    return out, metrics, facts


def _from_model(model, cfg: LMFileOptions, ctx: QuantContext):
    from compress.runtime.lm_export import export_lm
    from compress.runtime.onnx import OrtModel

    fp32 = export_lm(model.cpu(), ctx.out_dir / "model_fp32.onnx", cfg.opset)
    out, metrics, facts = quantize_lm_file(fp32, cfg, ctx)
    return OrtModel(out), metrics, facts


def _file_data(source):
    """A file's data as the user gave it: split -> token blocks (a mapping, or an .npz of such arrays) stays
    as it is; a data block (``name: lm``), a dataset name or a DataBundle is read as every file's data is."""
    if isinstance(source, (str, os.PathLike)) and str(source).endswith(".npz"):
        with np.load(source) as npz:
            return {k: npz[k] for k in npz.files}
    if isinstance(source, dict) and "name" not in source:
        return source
    return data_bundle(source)


def _from_file(src, cfg: LMFileOptions, ctx: QuantContext):
    from compress.runtime.onnx import OrtModel

    src = Path(src)
    if not src.is_file():
        raise CompressError(f"{src}: no such file")
    out, metrics, facts = quantize_lm_file(src, cfg, dataclasses.replace(ctx, data=_file_data(ctx.data)))
    return OrtModel(out), metrics, facts


register_method(NBitsConfig, produces="onnx", onnx_file=_from_file)(_from_model)
register_method(LMDynamicConfig, produces="onnx", onnx_file=_from_file)(_from_model)

__all__ = ["LMDynamicConfig", "NBitsConfig", "PerplexityCheckConfig", "lm_blocks", "quantize_lm_file"]
