"""Post-training int8 in ONNX Runtime: ``ptq_static`` (calibrated QDQ) and ``ptq_dynamic``.

The PyTorch model is left untouched; the handler returns an ``OrtModel`` running the int8 file. The same
two methods quantize a float ``.onnx`` file the user already has (``_ptq_file``): same settings, same check.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch

from pydantic import Field

from compress.config import StrictModel
from compress.errors import CompressError
from compress.evaluation import evaluate
from compress.quant import ptq_onnx
from compress.quant.methods.base import (Int8FileOptions, QuantContext, check_int8_file, data_bundle, needs_bits,
                                        register_method)
from compress.runtime.onnx import OrtModel, onnx_run, onnx_session


class CalibrationConfig(StrictModel):
    method: Literal["minmax", "entropy", "percentile"] = "minmax"
    batches: int = Field(8, ge=1)  # batches of the training split fed to ONNX Runtime's calibrator
    batch_size: Optional[int] = Field(None, ge=1)
    percentile: float = Field(99.999, gt=0, le=100)
    samples: Optional[int] = Field(None, ge=1)  # calibration samples (default: batches x batch size)

    def batches_of(self, batch_size: int) -> int:
        return math.ceil(self.samples / batch_size) if self.samples else self.batches


class PTQDynamicConfig(Int8FileOptions):
    """int8 weights, activations quantized at run time (ORT ``quantize_dynamic``): for Linear/RNN-heavy models."""

    method: Literal["ptq_dynamic"] = "ptq_dynamic"
    # Quantize only these ONNX op types (ORT's op_types_to_quantize), e.g. [Gemm, MatMul]: on tiny
    # convolutions ORT's int8 kernels are slower than fp32, while the weights sit in the dense layers.
    op_types: Optional[list[str]] = None

    def check_rules(self, path: str) -> None:
        needs_bits(self, path, (8,), f"{self.method} quantizes to int8 in ONNX Runtime")
        self.int8_format(path)


class PTQStaticConfig(PTQDynamicConfig):
    """Calibrated int8 QDQ (ORT ``quant_pre_process`` + ``quantize_static``) on training batches."""

    method: Literal["ptq_static"] = "ptq_static"
    calibration: CalibrationConfig = CalibrationConfig()
    preprocess: bool = True  # onnxruntime's quant_pre_process before static quantization
    # False keeps biases float in the file: ORT still fuses QLinearConv/QGemm (it quantizes them at
    # load) and the file drops each layer's int32 bias, bias scale and bias zero point.
    quantize_bias: bool = False


def _int8(fp32: Path, out: Path, cfg: PTQDynamicConfig, ctx: QuantContext, data, batch_size: int, *,
          split: str, labels: bool = True, input_name: str = "input") -> tuple[OrtModel, dict, dict]:
    """Quantize ``fp32`` into ``out`` (calibrated on ``data``'s train split), check it against ``fp32`` on its
    validation split and measure both on ``split``: what the stage and a user's file share."""
    fmt = cfg.int8_format(ctx.path)
    facts = {"method": cfg.method, "bits": 8}
    if isinstance(cfg, PTQStaticConfig):
        loader = data.loader("train", shuffle=False, batch_size=batch_size)
        ptq_onnx.quantize_static_onnx(fp32, out, loader, fmt, batches=cfg.calibration.batches_of(batch_size),
                                      method=cfg.calibration.method, percentile=cfg.calibration.percentile,
                                      preprocess=cfg.preprocess, quantize_bias=cfg.quantize_bias,
                                      op_types=cfg.op_types, scratch=ctx.out_dir, input_name=input_name)
        facts["calibration"] = cfg.calibration.method
    else:
        ptq_onnx.quantize_dynamic_onnx(fp32, out, fmt, op_types=cfg.op_types)
    fp32_session = onnx_session(fp32, None)
    check = check_int8_file(out, lambda x: onnx_run(fp32_session, x), data, cfg, fmt, ctx.path)
    ort_model = OrtModel(out)
    metrics = evaluate(ort_model, data, split, "cpu") if labels else {}
    facts.update({"artifact": str(out), "fp32_onnx": str(fp32), "fp32_onnx_bytes": fp32.stat().st_size,
                  "int8_onnx_bytes": out.stat().st_size, "size_ratio": round(fp32.stat().st_size / out.stat().st_size, 2),
                  "int8_check": check})
    if labels:
        facts["fp32_onnx_metrics"] = evaluate(OrtModel(fp32), data, split, "cpu")
    return ort_model, metrics, facts


def _ptq(model, cfg: PTQDynamicConfig, ctx: QuantContext):
    data = ctx.data
    fp32 = ptq_onnx.export_onnx(model.cpu(), data.example_input(1), ctx.out_dir / "model_fp32.onnx", cfg.opset)
    bs = cfg.calibration.batch_size or data.batch_size if isinstance(cfg, PTQStaticConfig) else data.batch_size
    return _int8(fp32, ctx.out_dir / "model_int8.onnx", cfg, ctx, data, bs, split=ctx.split)


# -- a float .onnx file the user already has ----------------------------------------------------------------

HELD_OUT = 64  # held-out samples per check batch (check.batches of them: 256 by default)


def _ptq_file(src: Path, cfg: PTQDynamicConfig, ctx: QuantContext):
    """compress's int8 of an existing float .onnx file: calibration samples and held-out samples from
    ``ctx.data``, the agreement check against the file, and its latency against the file (interleaved)."""
    src = Path(src)
    inp = ptq_onnx.float_input(src)
    static = isinstance(cfg, PTQStaticConfig)
    bs = inp.batch or (cfg.calibration.batch_size if static else None) or 64
    samples = cfg.calibration.samples if static else None
    default = cfg.calibration.batches * (cfg.calibration.batch_size or 64) if static else 0
    data, facts = _file_samples(ctx.data, inp, src, samples, default, cfg.check.batches * HELD_OUT, bs)
    n_cal, n_held = facts["calibration_samples"], facts["held_out_samples"]
    cfg = cfg.model_copy(update={"check": cfg.check.model_copy(update={"batches": math.ceil(n_held / bs)})})
    if static:
        cfg = cfg.model_copy(update={"calibration": cfg.calibration.model_copy(update={"samples": n_cal})})
    out = Path(ctx.artifact or ctx.out_dir / f"{src.stem}_int8.onnx")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        model, metrics, more = _int8(src, out, cfg, ctx, data, bs, split="val", labels=facts.pop("labels"),
                                     input_name=inp.name)
    except CompressError:
        raise
    except Exception as exc:  # ORT's quantizer on a graph it cannot take: its reason, in one line
        first = (str(exc).strip().splitlines() or [""])[0]
        raise CompressError(f"{src}: ONNX Runtime's quantizer cannot take it: {type(exc).__name__}: {first}") from None
    facts.update(more, input=inp.name, input_shape=inp.words())
    facts["latency"] = _latency(src, out, data, inp, ctx.benchmark)
    return model, metrics, facts


def _file_samples(source, inp: ptq_onnx.FloatInput, src: Path, samples: Optional[int], default: int, held_out: int,
                  bs: int):
    """(DataBundle of calibration samples as 'train' and held-out samples as 'val', facts), batched as the
    file takes them: a file fixed to batch ``bs`` gets whole batches only. ``default``: calibration samples
    when ``samples`` is None (0: none, dynamic quantization)."""
    from torch.utils.data import TensorDataset

    from compress.data import DataBundle

    if isinstance(source, (str, os.PathLike)) and str(source).endswith(".npz"):
        where, task, (cal, held) = str(source), "classification", _npz_split(Path(source), inp, samples, default)
    else:
        bundle = data_bundle(source)
        check_split = "val" if bundle.has("val") else "test"
        where = f"the data (train split, {check_split} split held out)" if default else f"the data's {check_split} split"
        cal = _take(bundle, "train", samples or default) if default else None
        held, task = _take(bundle, check_split, held_out), bundle.task
    parts = []
    for name, part in (("calibration", cal), ("held-out", held)):
        if part is None:
            parts.append(None)
            continue
        x = part[0]
        if not x.dtype.is_floating_point:
            raise CompressError(f"{where} gives {str(x.dtype).replace('torch.', '')} inputs; {src} takes "
                                f"'{inp.name}' as {inp.words()}")
        if not inp.fits(tuple(x.shape[1:])):
            raise CompressError(f"{where} gives inputs of shape ({', '.join(map(str, x.shape[1:]))}) per sample; "
                                f"{src} takes '{inp.name}' as {inp.words()}")
        step = inp.batch or 1
        n = len(x) // step * step
        if n == 0:
            raise CompressError(f"{where} gives {len(x)} {name} samples; {src} takes batches of {step}: "
                                f"expected at least {step}")
        parts.append((x[:n].float(), *(t[:n] for t in part[1:])))
    cal, held = parts
    labels = len(held) > 1
    data = DataBundle(TensorDataset(*(cal or held)), TensorDataset(*held), None, task=task, input_shape=tuple(held[0].shape[1:]),
                      batch_size=bs, eval_batch_size=bs)
    return data, {"calibration_samples": len(cal[0]) if cal else 0, "held_out_samples": len(held[0]), "labels": labels,
                  "data": where}


def _take(data, split: str, n: int) -> tuple:
    """The first ``n`` samples of ``split`` (inputs, labels) in file order."""
    xs, ys, got = [], [], 0
    for raw in data.loader(split, shuffle=False):
        if not isinstance(raw[0], torch.Tensor):
            raise CompressError(f"the data gives named inputs ({', '.join(raw[0])}); an .onnx file here takes one "
                                "float input")
        xs.append(raw[0])
        ys.append(raw[1])
        got += len(raw[0])
        if got >= n:
            break
    if not xs:
        raise CompressError(f"the data's {split} split is empty")
    return torch.cat(xs)[:n], torch.cat(ys)[:n]


def _npz_split(path: Path, inp: ptq_onnx.FloatInput, samples: Optional[int], default: int) -> tuple:
    """(calibration, held-out) samples: the first ``samples`` (default: 3/4 of the file, at most ``default``;
    none when ``default`` is 0) and the rest, from the array named like the input or the file's only array
    (``y``: optional labels)."""
    import zipfile

    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError, AttributeError, zipfile.BadZipFile) as exc:  # AttributeError: one .npy
        first = str(exc).split(". ")[0].splitlines()[0] if str(exc) else type(exc).__name__
        raise CompressError(f"{path}: not a readable .npz archive of numeric arrays ({first})") from None
    xs = [k for k in arrays if k != "y"]
    key = inp.name if inp.name in arrays else xs[0] if len(xs) == 1 else None
    if key is None:
        raise CompressError(f"{path}: expected an array named '{inp.name}' (the model's input) or one array "
                            f"(and optional labels 'y'); it holds {', '.join(arrays) or 'none'}")
    x = torch.from_numpy(np.ascontiguousarray(arrays[key]))
    n = len(x) if x.ndim else 0
    k = (samples or min(default, n * 3 // 4)) if default else 0
    if n - k < 1 or (default and k < 1):
        raise CompressError(f"{path}: {n} samples in '{key}'; expected more than the {k} calibration samples, "
                            "so that some are held out for the agreement check")
    y = torch.from_numpy(arrays["y"]) if "y" in arrays and len(arrays["y"]) == n else None
    cal, held = (x[:k],), (x[k:],)
    if y is not None:
        cal, held = cal + (y[:k],), held + (y[k:],)
    return (cal if k else None), held


def _latency(src: Path, out: Path, data, inp: ptq_onnx.FloatInput, benchmark) -> Optional[dict]:
    """Latency of the int8 file against the input file in ONNX Runtime, interleaved (``compress bench``'s
    measurement): {batch: {median_ms, baseline_median_ms, speedup, ...}}; None when switched off."""
    from compress.measure.config import BenchmarkConfig
    from compress.measure.latency import measure_latency
    from compress.measure.subject import Subject

    cfg = benchmark or BenchmarkConfig(progress=False)
    if not cfg.latency:
        return None
    cfg = cfg.model_copy(update={"backends": ["onnxruntime"], "gpu": False,
                                 "batch_sizes": [inp.batch] if inp.batch else cfg.batch_sizes})
    res = measure_latency(Subject(onnx=out), data, cfg, baseline=Subject(onnx=src), desc="latency")
    return {**res.get("onnxruntime", {}), "threads": res["threads"]}


register_method(PTQStaticConfig, produces="onnx", onnx_file=_ptq_file)(_ptq)
register_method(PTQDynamicConfig, produces="onnx", onnx_file=_ptq_file)(_ptq)
