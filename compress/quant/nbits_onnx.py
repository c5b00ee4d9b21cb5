"""Weight-only int4/int8 of a language model's ONNX file through ONNX Runtime's own ``MatMulNBitsQuantizer``
(MatMul -> ``MatMulNBits``, the token embedding Gather -> ``GatherBlockQuantized``), and int8 dynamic MatMuls
(``quantize_dynamic``) as the baseline. Every number here is ONNX Runtime's; this module picks the nodes
(the LM head and embeddings in or out) and feeds GPTQ its calibration token blocks.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Optional

import numpy as np

from compress.errors import CompressError

ALGORITHMS = ("default", "rtn", "k_quant", "gptq", "hqq")
# The algorithms ORT runs through Intel Neural Compressor's code path, which writes 4-bit weights only.
FOUR_BIT_ONLY = ("rtn", "k_quant", "gptq", "hqq")


def lm_head_node(graph) -> Optional[str]:
    """The MatMul that computes the ``logits`` output from a weight (walking back through Add/Cast/Reshape),
    found in the graph so that a file compress did not write works too."""
    producer = {o: n for n in graph.node for o in n.output}
    weights = {i.name for i in graph.initializer}
    node = producer.get("logits")
    for _ in range(4):
        if node is None:
            return None
        if node.op_type in ("MatMul", "Gemm") and any(i in weights for i in node.input):
            return node.name
        data = [i for i in node.input if i not in weights and i in producer]
        node = producer[data[0]] if data else None
    return None


class TokenBlockReader:
    """An onnxruntime CalibrationDataReader of token blocks [N, T], one block per call, each fed as a prefill
    (empty cache): what GPTQ collects its Hessians from."""

    def __init__(self, blocks: np.ndarray, cache_inputs: dict[str, tuple[int, int]]):
        self.blocks = np.asarray(blocks, np.int64)
        self.cache_inputs = cache_inputs  # name -> (kv_heads, head_dim)
        self.rewind()

    def rewind(self) -> None:
        self.i = 0

    def get_next(self):
        if self.i >= len(self.blocks):
            return None
        x = self.blocks[self.i:self.i + 1]
        self.i += 1
        t = x.shape[1]
        feed = {"input_ids": x, "attention_mask": np.ones_like(x), "position_ids": np.arange(t, dtype=np.int64)[None]}
        feed.update({n: np.zeros((1, h, 0, d), np.float32) for n, (h, d) in self.cache_inputs.items()})
        return feed

    def __iter__(self):  # ORT's GPTQ path iterates a deep copy of the reader
        self.rewind()
        while (item := self.get_next()) is not None:
            yield item


@contextlib.contextmanager
def _quiet():
    """ORT's weight-only quantizer logs one INFO line per node (its module calls logging.basicConfig(INFO)) and
    warns when it relabels the opset."""
    names = ("", "onnxruntime.quantization.matmul_nbits_quantizer", "onnxruntime.quantization.neural_compressor",
             "onnxruntime.quantization.neural_compressor.weight_only", "neural_compressor")
    loggers = [logging.getLogger(n) for n in names]
    old = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        import io
        import warnings

        # Intel Neural Compressor's GPTQ draws a progress bar on stdout
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, old):
            lg.setLevel(lv)


def _import_quantizer():
    """ORT's matmul_nbits_quantizer calls ``logging.basicConfig(level=INFO)`` when imported, which would print
    every later INFO line of every library in this process: undo what it did to the root logger."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    from onnxruntime.quantization import matmul_nbits_quantizer

    for h in root.handlers[:]:
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)
    return matmul_nbits_quantizer


def _cache_inputs(model) -> dict[str, tuple[int, int]]:
    out = {}
    for i in model.graph.input:
        if i.name.startswith("past_key_values."):
            d = i.type.tensor_type.shape.dim
            out[i.name] = (d[1].dim_value, d[3].dim_value)
    return out


def fuse_lm(model):
    """``model`` (an ONNX ModelProto) after ONNX Runtime's transformer optimizer: RMSNorm / LayerNorm with the
    residual Add as (Skip)SimplifiedLayerNormalization / SkipLayerNormalization, GELU as FastGelu.

    Its attention and rotary fusions are left off: they match the graphs of older exports (LLaMA-2 era, ORT's own
    GPT-2 past format), not this one (the SDPA decomposition with its NaN guard and repeat_kv), and none fires on
    Llama or GPT-2 here; turned off, a future match cannot change the cache interface. Float-exact (logits within
    2e-6); int4 decode 1.04-1.16x (docs/lm-deploy.md, benchmarks/lm_fusion.py)."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("gpt2")
    options.enable_attention = options.enable_rotary_embeddings = False
    options.enable_embed_layer_norm = False  # keeps the token embedding a plain Gather (GatherBlockQuantized)
    try:
        with _quiet():
            return optimize_model(model, model_type="gpt2", opt_level=0, optimization_options=options).model
    except Exception as exc:
        from compress.errors import error_line

        raise CompressError(f"ONNX Runtime's transformer optimizer failed on this LM file (fuse: false skips it): "
                            f"{error_line(exc)}") from None


def quantize_nbits(fp32: str | Path, out: str | Path, *, bits: int = 4, block_size: int = 32,
                   algorithm: str = "default", symmetric: bool = False, accuracy_level: Optional[int] = None,
                   lm_head: bool = False, embeddings: bool = False, calibration: Optional[np.ndarray] = None,
                   fuse: bool = False) -> Path:
    """Quantize ``fp32``'s weight MatMuls to ``bits`` in blocks of ``block_size`` input channels.

    ``algorithm``: default (ORT's C++ blockwise rounding, 4 or 8 bits), rtn / k_quant (Intel Neural Compressor's
    round-to-nearest / k-quant), gptq (needs ``calibration`` token blocks), hqq (half-quadratic, data-free).
    ``lm_head`` / ``embeddings``: also quantize the LM head MatMul / the token embedding Gather (4 bits, default
    algorithm: ORT's GatherBlockQuantized). ``accuracy_level``: MatMulNBits' compute type (4: int8 activations).
    """
    import onnx

    mq = _import_quantizer()
    if algorithm not in ALGORITHMS:
        raise CompressError(f"unknown weight-only algorithm {algorithm!r}; expected one of {', '.join(ALGORITHMS)}")
    if bits != 4 and algorithm in FOUR_BIT_ONLY:
        raise CompressError(f"{algorithm} writes 4-bit weights only in ONNX Runtime; use algorithm default for {bits} bits")
    if embeddings and (bits != 4 or algorithm != "default"):
        raise CompressError("quantized embeddings (GatherBlockQuantized) need bits 4 and algorithm default")
    model = onnx.load(str(fp32))
    if embeddings:
        # GatherBlockQuantized stores int4 tensors, which need opset 21: ORT's quantizer only relabels the
        # opset (ReduceMean's axes then break the graph); ONNX's converter rewrites the ops that changed.
        from onnx import version_converter

        model = version_converter.convert_version(model, 21)
    head = lm_head_node(model.graph)
    exclude = [head] if head and not lm_head else []
    op_types = ("MatMul", "Gather") if embeddings else ("MatMul",)
    if algorithm == "gptq":
        if calibration is None or len(calibration) == 0:
            raise CompressError("gptq needs calibration token blocks")
        # GPTQ's own block_size is the columns per update step (128 in the paper); the group size is ours.
        algo = mq.GPTQWeightOnlyQuantConfig(calibration_data_reader=TokenBlockReader(calibration, _cache_inputs(model)),
                                            op_types_to_quantize=op_types)
    elif algorithm == "rtn":
        algo = mq.RTNWeightOnlyQuantConfig(op_types_to_quantize=op_types)
    elif algorithm == "k_quant":
        algo = mq.KQuantWeightOnlyQuantConfig(op_types_to_quantize=op_types)
    elif algorithm == "hqq":
        algo = mq.HQQWeightOnlyQuantConfig(block_size=block_size, bits=bits, op_types_to_quantize=op_types)
    else:
        algo = mq.DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=symmetric, accuracy_level=accuracy_level,
                                               op_types_to_quantize=op_types, bits=bits)
    with _quiet():
        q = mq.MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=symmetric,
                                    accuracy_level=accuracy_level, nodes_to_exclude=exclude,
                                    op_types_to_quantize=op_types, algo_config=algo)
        if exclude and algorithm == "gptq":
            # ORT passes nodes_to_exclude on to Intel Neural Compressor's RTN but not to its GPTQ; both skip
            # the nodes whose weight config is "fp32" (onnxruntime/quantization/neural_compressor/weight_only.py).
            configs = q._generate_q4_node_config
            q._generate_q4_node_config = lambda: {**configs(), **{n: "fp32" for n in exclude}}
        try:
            q.process()
        except Exception as exc:  # e.g. Intel Neural Compressor's RTN with blocks wider than a layer's inputs
            from compress.errors import error_line

            raise CompressError(f"{fp32}: ONNX Runtime's {algorithm} {bits}-bit quantizer failed (block_size "
                                f"{block_size}): {error_line(exc)}") from None
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fuse:  # after quantizing: Intel Neural Compressor's GPTQ breaks on the fused graph (a dangling shape input)
        onnx.save(fuse_lm(q.model.model), str(out))
    else:
        q.model.save_model_to_file(str(out), use_external_data_format=False)
    if accuracy_level is not None and algorithm == "hqq":
        _set_accuracy_level(out, accuracy_level)
    return out


def _set_accuracy_level(path: Path, level: int) -> None:
    """ORT's HQQ quantizer takes no accuracy level: set it on each MatMulNBits it wrote."""
    import onnx
    from onnx import helper

    model = onnx.load(str(path))
    for n in model.graph.node:
        if n.op_type == "MatMulNBits":
            kept = [a for a in n.attribute if a.name != "accuracy_level"]
            del n.attribute[:]
            n.attribute.extend(kept + [helper.make_attribute("accuracy_level", level)])
    onnx.save(model, str(path))


def quantize_lm_dynamic(fp32: str | Path, out: str | Path, *, lm_head: bool = False, target_cpu: str = "any") -> Path:
    """int8 dynamic MatMuls (ORT ``quantize_dynamic``, compress's int8 format for ``target_cpu``): the baseline the
    weight-only files are compared with."""
    import onnx

    from compress.quant.int8 import resolve_format
    from compress.quant.ptq_onnx import quantize_dynamic_onnx

    head = lm_head_node(onnx.load(str(fp32), load_external_data=False).graph)
    exclude = [head] if head and not lm_head else []
    with _quiet():
        return quantize_dynamic_onnx(Path(fp32), Path(out), resolve_format(target_cpu=target_cpu), op_types=["MatMul"],
                                     nodes_to_exclude=exclude)


def nbits_ops(path: str | Path) -> dict[str, int]:
    """Quantized node counts of a file: what the report says was quantized."""
    from compress.quant.ptq_onnx import op_counts

    counts = op_counts(path)
    return {k: v for k, v in counts.items() if k in ("MatMulNBits", "GatherBlockQuantized", "MatMulInteger", "MatMul")}


__all__ = ["ALGORITHMS", "TokenBlockReader", "fuse_lm", "lm_head_node", "nbits_ops", "quantize_lm_dynamic", "quantize_nbits"]
