"""Does ONNX Runtime's own graph optimization close the decode gap to ONNX Runtime GenAI's builder? A random-init
Llama (GQA) exported by compress (``export_lm``), then: ONNX Runtime's transformer optimizer
(``onnxruntime.transformers.optimizer.optimize_model``) with each decoder model type, and ORT's session-level
ORT_ENABLE_ALL saved offline (``SessionOptions.optimized_model_filepath``); each fp32 and int4 (MatMulNBits RTN
block 32, accuracy level 4, LM head too), and compress's own ``quantize_nbits(fuse=True)``. Reported: node count, fused ops, decode tok/s (interleaved, one thread),
max |logit difference| over a prefill and 32 greedy decode steps against the unoptimized fp32 file, and whether
the greedy tokens are identical.

    .venv/bin/python -m benchmarks.lm_fusion [--size small|teacher]
"""
from __future__ import annotations

import collections
import time
from pathlib import Path

import click
import numpy as np
import onnx
import torch

from benchmarks.common import ROOT, machine_line, markdown_table
from benchmarks.lm_deploy import BLOCK, SIZES


def ort_offline(src: Path, dst: Path) -> Path:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(dst)
    so.intra_op_num_threads = 1
    ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
    return dst


def transformer_opt(src: Path, dst: Path, model_type: str, heads: int, hidden: int) -> Path:
    from onnxruntime.transformers.optimizer import optimize_model

    m = optimize_model(str(src), model_type=model_type, num_heads=heads, hidden_size=hidden, opt_level=0)
    m.save_model_to_file(str(dst))
    return dst


def greedy_trace(path: Path, prompt: np.ndarray, steps: int) -> tuple[list[np.ndarray], list[int]]:
    from compress.runtime.lm_export import OrtLM

    lm = OrtLM(path, 1)
    ids, n = prompt, prompt.shape[1]
    logits, cache = lm.step(ids, np.ones((1, n), np.int64), np.arange(n)[None], lm.empty_cache(1))
    outs, toks = [logits[:, -1]], []
    for _ in range(steps):
        t = int(outs[-1].argmax())
        toks.append(t)
        logits, cache = lm.step(np.array([[t]]), np.ones((1, n + 1), np.int64), np.array([[n]]), cache)
        n += 1
        outs.append(logits[:, -1])
    return outs, toks


@click.command()
@click.option("--size", type=click.Choice(sorted(SIZES)), default="small", show_default=True)
@click.option("--runs", type=int, default=30, show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=ROOT / "runs" / "lm_fusion", show_default=True)
def main(size, runs, out):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from compress.measure.generation import measure_generation
    from compress.quant.nbits_onnx import quantize_nbits
    from compress.runtime.lm_export import export_lm

    print(machine_line())
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=4096, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
                      **SIZES[size])
    model = AutoModelForCausalLM.from_config(cfg).eval()
    heads, hidden = cfg.num_attention_heads, cfg.hidden_size
    fp32 = export_lm(model, out / "fp32.onnx")
    files = {"fp32": fp32}
    notes = {}
    try:
        files["fp32 ORT_ENABLE_ALL offline"] = ort_offline(fp32, out / "fp32_ortall.onnx")
    except Exception as exc:
        notes["ORT_ENABLE_ALL offline"] = f"failed: {str(exc).splitlines()[0]}"
    for mt in ("gpt2", "qwen3", "gpt_neox", "bert"):
        t = time.time()
        try:
            files[f"fp32 optimize_model {mt}"] = transformer_opt(fp32, out / f"fp32_{mt}.onnx", mt, heads, hidden)
            notes[mt] = f"{time.time() - t:.1f}s"
        except Exception as exc:
            notes[mt] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    for name in [n for n in files]:
        q = out / (files[name].stem + "_int4.onnx")
        try:
            files[name.replace("fp32", "int4", 1)] = quantize_nbits(files[name], q, block_size=32, accuracy_level=4,
                                                                   lm_head=True)
        except Exception as exc:
            notes[f"int4 of {name}"] = f"failed: {str(exc).splitlines()[0]}"
    files["int4 quantize_nbits(fuse=True)"] = quantize_nbits(fp32, out / "int4_fuse.onnx", block_size=32,
                                                             accuracy_level=4, lm_head=True, fuse=True)
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 16))
    rows = []
    traces = {}
    for name, path in files.items():
        try:
            traces[name] = greedy_trace(path, prompt, 32)
        except Exception as exc:
            notes[f"run {name}"] = f"failed: {str(exc).splitlines()[0]}"
    speeds = {s.name: s for s in measure_generation({k: v for k, v in files.items() if k in traces}, baseline="fp32",
                                                    prompt_tokens=BLOCK, runs=runs)}
    for name, path in files.items():
        if name not in traces:
            continue
        base = traces.get("fp32" if name.startswith("fp32") else "int4")
        ops = collections.Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)
        fused = {k: v for k, v in ops.items() if k in ("GroupQueryAttention", "MultiHeadAttention", "Attention",
                 "RotaryEmbedding", "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization",
                 "FusedMatMul", "MatMulNBits")}
        diff = max(float(np.abs(a - b).max()) for a, b in zip(traces[name][0], base[0])) if base else float("nan")
        same = traces[name][1] == base[1] if base else None
        d32 = max(float(np.abs(a - b).max()) for a, b in zip(traces[name][0], traces["fp32"][0]))
        same32 = traces[name][1] == traces["fp32"][1]
        s = speeds[name]
        rows.append([name, str(sum(ops.values())), ", ".join(f"{k} {v}" for k, v in sorted(fused.items())) or "-",
                     f"{s.decode_tokens_per_s:.0f}", f"{s.decode_speedup or 1:.2f}x", f"{s.prefill_ms:.1f}",
                     f"{diff:.2e}", str(same), f"{d32:.2e}", str(same32)])
    print(markdown_table(["file", "nodes", "fused ops", "decode tok/s", "decode vs fp32", "prefill ms",
                          "max |dlogit| vs unoptimized, same precision", "same 32 greedy tokens",
                          "max |dlogit| vs fp32", "same tokens as fp32"], rows))
    print("notes: " + "; ".join(f"{k}: {v}" for k, v in notes.items()))


if __name__ == "__main__":
    main()
