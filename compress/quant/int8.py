"""int8 files that compute the same on every x86 CPU, and the check that proves it on the machine that makes them.

ONNX Runtime's x86 kernels for uint8 activations x int8 weights (U8S8; S8S8 is converted to it) use
VPMADDUBSW on AVX2 and AVX-512 CPUs without VNNI: it adds two u8 x s8 products into a saturating int16,
so 255 x 127 + 255 x 127 clips at 32,767 and the layer computes something the file does not say. ORT's
quantization guide names the remedies: 7-bit weights (``reduce_range``) or uint8 weights (U8U8). Measured
on an AVX-512 VNNI CPU (benchmarks/int8_cpus.py), U8U8 runs 1.5-1.6x slower than U8S8 while
``reduce_range`` keeps the U8S8 speed, so a file meant for any CPU (``target_cpu: any``, the default)
gets 7-bit weights: with |w| <= 64 a pair of products is at most 2 x 255 x 64 = 32,640, which fits.

The check (``check_int8``) runs the int8 file in ORT's kernels, in ORT's float simulation of the same
file (graph optimizations off: QuantizeLinear/DequantizeLinear run as float ops, no int8 kernel), and
compares both with the float reference on real validation inputs. Kernel != simulation is a CPU/kernel
problem; simulation != reference is quantization error. Hand-written because ORT has no such check.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Optional

import numpy as np
import torch

from compress.errors import CompressError
from compress.runtime.cpu import cpu_features

TargetCpu = Literal["any", "vnni", "native"]
SAFE_WEIGHT_ABS = 64  # |int8 weight - zero point| up to this cannot saturate VPMADDUBSW (2 x 255 x 64 < 2^15)


def cpu_words(features: Optional[dict] = None) -> str:
    """'AVX2 without VNNI' style summary for messages and tables."""
    f = features or cpu_features()
    names = [n.upper().replace("_", "-") for n in f["int8_flags"]]
    return f"{f['arch']} with {', '.join(names) if names else 'no AVX2/AVX-512'}"


@dataclass(frozen=True)
class Int8Format:
    """What goes into the file: weight and activation types, 7-bit weights or not, per-channel scales."""

    weight_type: Literal["int8", "uint8"] = "int8"
    activation_type: Literal["uint8", "int8"] = "uint8"
    reduce_range: bool = True
    per_channel: bool = True

    @property
    def portable(self) -> bool:
        """Right on every x86 CPU: no U8S8 product pair can leave int16."""
        return self.weight_type == "uint8" or self.reduce_range

    def words(self) -> str:
        w = "uint8" if self.weight_type == "uint8" else ("int8 (7-bit range)" if self.reduce_range else "int8")
        return f"{w} weights, {self.activation_type} activations"


def resolve_format(weight_type: str = "auto", reduce_range: bool | str = "auto", target_cpu: TargetCpu = "any",
                   activation_type: str = "uint8", per_channel: bool = True, path: str = "quantize") -> Int8Format:
    """Turn the config's ``auto`` values into a concrete format for the CPU the file is meant for.

    ``any``: right on every x86 CPU (7-bit int8 weights, ORT's U8S8 speed everywhere); ``vnni``: full
    8-bit int8 weights for CPUs with VNNI/AMX (wrong on AVX2-only CPUs); ``native``: whichever of the two
    this machine needs.
    """
    from compress.errors import RecipeError

    wt = "int8" if weight_type == "auto" else weight_type
    if target_cpu == "native":
        needs_safe = cpu_features()["u8s8_saturates"]
    else:
        needs_safe = target_cpu == "any"
    if reduce_range == "auto":
        rr = wt == "int8" and needs_safe
    else:
        rr = bool(reduce_range)
        if needs_safe and wt == "int8" and not rr:
            where = "this CPU" if target_cpu == "native" else "CPUs with AVX2 or AVX-512 but no VNNI"
            raise RecipeError(f"{path}.reduce_range", f"full-range int8 weights saturate ONNX Runtime's int8 kernels on "
                              f"{where}; expected reduce_range: true (or auto), weight_type: uint8, or target_cpu: vnni")
    return Int8Format(wt, activation_type, rr, per_channel)


# -- what a file holds -------------------------------------------------------------------------------

def _load(path: str | Path):
    """The ONNX model with its Constant nodes as initializers (torch's exporter writes QAT weights as Constants)."""
    import onnx

    model = onnx.load(str(path))
    graph = model.graph
    consts = [n for n in graph.node if n.op_type == "Constant" and len(n.attribute) == 1 and n.attribute[0].name == "value"]
    for n in consts:
        t = onnx.TensorProto()
        t.CopyFrom(n.attribute[0].t)
        t.name = n.output[0]
        graph.initializer.append(t)
        graph.node.remove(n)
    return model


def _weight_inputs(graph) -> list[tuple[str, Optional[str]]]:
    """(weight, zero point) initializer names of every integer matmul/conv input that is a constant."""
    inits = {i.name for i in graph.initializer}
    out = []
    for n in graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in inits:
            out.append((n.input[0], n.input[2] if len(n.input) > 2 and n.input[2] else None))
        elif n.op_type == "QuantizeLinear" and n.input[0] in inits:  # a float weight quantized in the graph
            out.append((n.output[0], n.input[2] if len(n.input) > 2 and n.input[2] else None))
        elif n.op_type in ("MatMulInteger", "ConvInteger") and len(n.input) > 1 and n.input[1] in inits:
            out.append((n.input[1], n.input[3] if len(n.input) > 3 and n.input[3] else None))
        elif n.op_type in ("QLinearConv", "QLinearMatMul") and n.input[3] in inits:
            out.append((n.input[3], n.input[5]))
    return out


def _weight_codes(model, name: str) -> Optional[np.ndarray]:
    """Integer codes of weight ``name``: an initializer, or a QuantizeLinear of a float initializer."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    if name in inits:
        return numpy_helper.to_array(inits[name])
    for n in model.graph.node:
        if n.op_type == "QuantizeLinear" and n.output[0] == name:
            w = numpy_helper.to_array(inits[n.input[0]]).astype(np.float32)
            s = numpy_helper.to_array(inits[n.input[1]]).astype(np.float32)
            zp = numpy_helper.to_array(inits[n.input[2]]) if len(n.input) > 2 and n.input[2] in inits else np.array(0, np.uint8)
            axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
            if s.ndim == 1 and s.size > 1:
                shape = [1] * w.ndim
                shape[axis] = -1
                s, zp = s.reshape(shape), zp.reshape(shape)
            info = np.iinfo(zp.dtype)
            return np.clip(np.rint(w / s) + zp.astype(np.int32), info.min, info.max).astype(zp.dtype)
    return None


def saturation_risk(path: str | Path) -> list[str]:
    """Weights in the file that can saturate ORT's U8S8 kernels on CPUs without VNNI (empty: portable).

    int8 weights are safe when every |code - zero point| <= 64; uint8 weights run the U8U8 kernels,
    which widen to 16 bits before multiplying and never saturate.
    """
    from onnx import numpy_helper

    model = _load(path)
    inits = {i.name: i for i in model.graph.initializer}
    risky = []
    for w_name, zp_name in _weight_inputs(model.graph):
        codes = _weight_codes(model, w_name)
        if codes is None or codes.dtype != np.int8:
            continue
        zp = numpy_helper.to_array(inits[zp_name]).astype(np.int32) if zp_name in inits else 0
        if codes.ndim and np.ndim(zp) == 1 and np.size(zp) > 1:
            zp = zp.reshape([-1] + [1] * (codes.ndim - 1)) if codes.shape[0] == np.size(zp) else zp
        if np.abs(codes.astype(np.int32) - zp).max(initial=0) > SAFE_WEIGHT_ABS:
            risky.append(w_name)
    return risky


def fold_weights(path: str | Path) -> Path:
    """Store weights quantized inside the graph (QuantizeLinear of a float constant, as torch's exporter
    writes QAT weights) as int8 codes: the file shrinks 4x and means the same numbers."""
    import onnx
    from onnx import numpy_helper

    model = _load(path)
    graph = model.graph
    names = {i.name for i in graph.initializer}
    folded = [n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] in names]
    for n in folded:
        graph.initializer.append(numpy_helper.from_array(_weight_codes(model, n.output[0]), n.output[0]))
    for n in folded:
        graph.node.remove(n)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    onnx.save(model, str(path))
    return Path(path)


def to_uint8_weights(path: str | Path) -> Path:
    """Rewrite a QDQ file's int8 weights as uint8 (+128, zero point +128): the same numbers, U8U8 kernels.

    Exact: (q + 128) - (zp + 128) = q - zp. Weights quantized inside the graph (QuantizeLinear of a float
    constant, as torch's exporter writes QAT weights) are folded to codes first.
    """
    import onnx
    from onnx import numpy_helper

    model = _load(fold_weights(path))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    done: set[str] = set()
    for w_name, zp_name in _weight_inputs(graph):
        for name in (w_name, zp_name):
            if name is None or name in done or name not in inits:
                continue
            arr = numpy_helper.to_array(inits[name])
            if arr.dtype == np.int8:
                inits[name].CopyFrom(numpy_helper.from_array((arr.astype(np.int16) + 128).astype(np.uint8), name))
            done.add(name)
    onnx.save(model, str(path))
    return Path(path)


# -- the check on the machine that makes the file -------------------------------------------------------

@dataclass
class Int8Check:
    """int8 file vs its float reference on real inputs; also the file's own float simulation."""

    split: str
    samples: int
    max_abs_diff: float  # |int8 kernels - float reference|
    rel_diff: float  # max_abs_diff / max |reference output|
    top1_agreement: Optional[float]  # share of samples whose predicted class agrees (classification)
    sim_rel_diff: float  # |float simulation of the file - reference| / max |reference|
    kernel_rel_diff: float  # |int8 kernels - float simulation| / max |reference|: the CPU's share
    sim_top1_agreement: Optional[float]
    portable: bool  # no weight in the file can saturate U8S8 kernels
    cpu: str

    def as_dict(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def _agreement(a: np.ndarray, b: np.ndarray, classification: bool) -> Optional[float]:
    if not classification or a.ndim != 2 or a.shape[1] < 2:
        return None
    return float((a.argmax(1) == b.argmax(1)).mean())


def check_int8(int8_path: Path, reference: Callable[[torch.Tensor], np.ndarray], data, *, split: str,
               batches: int = 4, classification: Optional[bool] = None) -> Int8Check:
    """Run ``int8_path`` in ORT's int8 kernels and in its float simulation against ``reference`` on
    ``batches`` batches of ``split``."""
    from compress.runtime.onnx import onnx_run, onnx_session

    classification = data.task == "classification" if classification is None else classification
    kernels = onnx_session(int8_path, None)
    simulation = onnx_session(int8_path, None, optimize=False)
    refs, ints, sims = [], [], []
    for i, raw in enumerate(data.loader(split, shuffle=False)):
        if i >= batches:
            break
        x = raw[0]
        refs.append(np.asarray(reference(x), dtype=np.float64))
        ints.append(onnx_run(kernels, x).astype(np.float64))
        sims.append(onnx_run(simulation, x).astype(np.float64))
    if not refs:
        raise CompressError(f"no {split} samples to check the int8 file against its float reference")
    ref, got, sim = (np.concatenate(a) for a in (refs, ints, sims))
    if ref.shape != got.shape:
        raise CompressError(f"the int8 file returns outputs of shape {got.shape}, its float reference {ref.shape}")
    scale = max(float(np.abs(ref).max(initial=0.0)), 1e-12)
    return Int8Check(split=split, samples=int(ref.shape[0]), max_abs_diff=float(np.abs(got - ref).max(initial=0.0)),
                     rel_diff=float(np.abs(got - ref).max(initial=0.0)) / scale,
                     top1_agreement=_agreement(got, ref, classification),
                     sim_rel_diff=float(np.abs(sim - ref).max(initial=0.0)) / scale,
                     kernel_rel_diff=float(np.abs(got - sim).max(initial=0.0)) / scale,
                     sim_top1_agreement=_agreement(sim, ref, classification),
                     portable=not saturation_risk(int8_path), cpu=cpu_words())


def verdict(check: Int8Check, *, max_rel_diff: float, min_top1_agreement: float, max_kernel_diff: float = 0.05) -> Optional[str]:
    """None when the file passes; else one sentence: the measured difference and its likely cause.

    Two bars: int8 vs the float reference (quantization error, with room for it), and int8 kernels vs the
    file's own float simulation (must agree up to requantization rounding: a few output steps).
    """
    top1_bad = check.top1_agreement is not None and check.top1_agreement < min_top1_agreement
    kernel_bad = check.kernel_rel_diff > max_kernel_diff
    if not top1_bad and not kernel_bad and check.rel_diff <= max_rel_diff:
        return None
    measured = (f"int8 outputs differ from the float reference by up to {check.rel_diff:.1%} of the output range"
                + (f", top-1 agreement {check.top1_agreement:.1%}" if check.top1_agreement is not None else "")
                + f" on {check.samples} {check.split} samples (allowed: {max_rel_diff:.0%}, "
                  f"{min_top1_agreement:.0%})")
    cause = kernel_cause(check, max_kernel_diff) or (
        f"quantization itself loses this (the file's float simulation is {check.sim_rel_diff:.1%} off too): "
        "try more calibration batches, calibration entropy or percentile, per-channel weights, "
        "op_types to keep sensitive layers in float, or QAT")
    return f"{measured}: {cause}"


def kernel_cause(check: Int8Check, max_kernel_diff: float) -> Optional[str]:
    """The sentence blaming this CPU's int8 kernels, or None when the kernels compute what the file says."""
    # Dynamic-quantization files run integer kernels even unoptimized: there the file's weights tell.
    if check.kernel_rel_diff <= max_kernel_diff and (check.portable or not cpu_features()["u8s8_saturates"]):
        return None
    cause = (f"the file is right (ONNX Runtime's float simulation of it differs by {check.sim_rel_diff:.1%}) "
             f"but the int8 kernels of this CPU ({check.cpu}) compute it {check.kernel_rel_diff:.1%} off "
             f"(allowed: {max_kernel_diff:.0%})")
    if not check.portable:
        cause += ("; full-range int8 weights saturate U8S8 kernels on CPUs without VNNI: use reduce_range: true "
                  "or weight_type: uint8 (target_cpu: any chooses this)")
    return cause
