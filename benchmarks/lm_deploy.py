"""A causal LM deployed on the CPU: its fp32 ONNX file with a key-value cache, int8 dynamic, int4 RTN and int4 GPTQ
(block 32, ONNX Runtime's MatMulNBits), beside ONNX Runtime GenAI's model builder (int4, block 32) run on the same
saved Hugging Face folder. For each file: test perplexity of the file itself, file size, prefill latency of a
128-token prompt and cached decode tokens/s at batch 1, all files and PyTorch eager timed interleaved in one
process (compress.measure.generation).

    .venv/bin/python -m benchmarks.lm_deploy --model FOLDER        # a local HF causal LM folder with its tokenizer
    .venv/bin/python -m benchmarks.lm_deploy --train-minutes 4     # else: a ~5M Llama trained here on stdlib text
    .venv/bin/python -m benchmarks.lm_deploy --size teacher --train-minutes 0   # ~21M, random init: speed only

Text: the running interpreter's standard library (``sysconfig``), split into train/val/test by file with seed 0,
packed into non-overlapping 128-token blocks. The builder is optional (``pip install onnxruntime-genai``): without
it its row says so.
"""
from __future__ import annotations

import json
import random
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import click
import numpy as np
import torch

from benchmarks.common import ROOT, machine_info, machine_line, markdown_table

BLOCK = 128


def stdlib_split(seed: int = 0, max_chars: int = 6_000_000) -> dict[str, list[str]]:
    """The stdlib's .py files (tests left out), shuffled by file with ``seed``: 80/10/10 train/val/test."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "test" not in p.parts and "site-packages" not in p.parts)
    random.Random(seed).shuffle(files)
    texts, total = [], 0
    for p in files:
        try:
            t = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        texts.append(t)
        total += len(t)
        if total >= max_chars:
            break
    n = len(texts)
    return {"train": texts[: int(0.8 * n)], "val": texts[int(0.8 * n): int(0.9 * n)], "test": texts[int(0.9 * n):]}


def blocks(tok, texts: list[str], n: int) -> np.ndarray:
    """Up to ``n`` non-overlapping blocks of BLOCK tokens of the texts joined with the end-of-text token."""
    eos = tok.eos_token_id if tok.eos_token_id is not None else 0
    ids: list[int] = []
    for t in texts:
        ids += tok(t, add_special_tokens=False)["input_ids"] + [eos]
        if len(ids) >= n * BLOCK:
            break
    k = min(n, len(ids) // BLOCK)
    return np.array(ids[: k * BLOCK], np.int64).reshape(k, BLOCK)


# Llama shapes with grouped-query attention (2 key-value groups), vocabulary 4096: ~5M and ~21M parameters.
SIZES = {"small": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4),
         "teacher": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=6, num_attention_heads=8)}


def train_model(folder: Path, split: dict, minutes: float, size: str = "small", seed: int = 0) -> None:
    """A Llama of ``size`` and a byte-level BPE tokenizer, trained here from scratch for ``minutes`` (0: random
    init, for speed alone)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(split["train"][:400], trainers.BpeTrainer(
        vocab_size=4096, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>")
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=4096, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
                      bos_token_id=0, eos_token_id=0, pad_token_id=0, **SIZES[size])
    model = AutoModelForCausalLM.from_config(cfg)
    data = torch.from_numpy(blocks(tok, split["train"], 4000))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    t0, step, loss = time.time(), 0, torch.tensor(float("nan"))
    model.train()
    while time.time() - t0 < minutes * 60:
        x = data[torch.randint(len(data), (8,), generator=g)]
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 20 == 0:
            print(f"  step {step}: loss {loss.item():.3f} ({time.time() - t0:.0f}s)", flush=True)
    print(f"trained {step} steps of 8x{BLOCK} tokens in {time.time() - t0:.0f}s (final loss {loss.item():.3f})")
    model.eval().save_pretrained(folder)
    tok.save_pretrained(folder)


def builder(folder: Path, out: Path, block: int = 32) -> tuple[Path | None, str]:
    """ONNX Runtime GenAI's model builder, int4 for the CPU, on the saved folder: (model.onnx, note)."""
    import importlib.util

    if importlib.util.find_spec("onnxruntime_genai") is None:
        return None, "onnxruntime-genai not installed (pip install onnxruntime-genai)"
    import onnxruntime_genai

    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(folder), "-o", str(out), "-p", "int4",
           "-e", "cpu", "-c", str(out / "cache"), "--extra_options", f"int4_block_size={block}", "int4_accuracy_level=4"]
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0 or not (out / "model.onnx").is_file():
        return None, f"builder failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}"
    return out / "model.onnx", f"onnxruntime-genai {onnxruntime_genai.__version__}, built in {time.time() - t0:.0f}s"


def file_bytes(path: Path) -> int:
    """The .onnx file and its external data files (the builder writes model.onnx.data)."""
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*") if p.is_file())


@click.command()
@click.option("--model", "model_dir", type=click.Path(file_okay=False, path_type=Path),
              help="A local HF causal LM folder with its tokenizer (default: train one here).")
@click.option("--train-minutes", type=float, default=4.0, show_default=True, help="0: random init (speed only).")
@click.option("--size", type=click.Choice(sorted(SIZES)), default="small", show_default=True,
              help="The model trained here when --model is not given.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=ROOT / "runs" / "lm_deploy", show_default=True)
@click.option("--test-blocks", type=int, default=32, show_default=True, help="128-token test blocks for perplexity.")
@click.option("--gptq-blocks", type=int, default=16, show_default=True, help="128-token training blocks GPTQ calibrates on.")
@click.option("--runs", type=int, default=20, show_default=True, help="Interleaved timing samples per model.")
@click.option("--all-threads/--one-thread", default=False, show_default=True, help="Also time with one thread per core.")
@click.option("--no-builder", is_flag=True)
def main(model_dir, train_minutes, size, out, test_blocks, gptq_blocks, runs, all_threads, no_builder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compress.measure.generation import measure_generation
    from compress.quant.nbits_onnx import nbits_ops, quantize_lm_dynamic, quantize_nbits
    from compress.runtime.generate import generate, onnx_perplexity, perplexity
    from compress.runtime.lm_export import export_lm

    print(machine_line())
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.time()
    split = stdlib_split()
    if model_dir is None:
        model_dir = out / "hf_model"
        train_model(model_dir, split, train_minutes, size)
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False).eval()
    params = sum(p.numel() for p in model.parameters())
    test, cal = blocks(tok, split["test"], test_blocks), blocks(tok, split["train"], gptq_blocks)
    print(f"model: {model.config.model_type}, {params / 1e6:.1f}M parameters; test: {len(test)} blocks of {BLOCK} tokens "
          f"(python {sys.version.split()[0]} stdlib, split by file)")

    files: dict[str, Path] = {}
    notes: dict[str, str] = {}
    t = time.time()
    files["fp32"] = export_lm(model, out / "fp32.onnx")
    notes["fp32"] = f"export {time.time() - t:.0f}s"
    t = time.time()
    files["int8 dynamic"] = quantize_lm_dynamic(files["fp32"], out / "int8_dynamic.onnx")
    notes["int8 dynamic"] = f"{time.time() - t:.0f}s"
    t = time.time()
    files["int4 RTN b32"] = quantize_nbits(files["fp32"], out / "int4_rtn.onnx", block_size=32, accuracy_level=4)
    notes["int4 RTN b32"] = f"{time.time() - t:.0f}s"
    files["int4 RTN b32 + head"] = quantize_nbits(files["fp32"], out / "int4_rtn_head.onnx", block_size=32,
                                                  accuracy_level=4, lm_head=True)
    t = time.time()
    files["int4 GPTQ b32"] = quantize_nbits(files["fp32"], out / "int4_gptq.onnx", block_size=32, algorithm="gptq",
                                            accuracy_level=4, calibration=cal)
    notes["int4 GPTQ b32"] = f"{time.time() - t:.0f}s, {len(cal)} calibration blocks"
    if not no_builder:
        path, note = builder(model_dir, out / "builder_int4")
        notes["ORT GenAI builder int4 b32"] = note
        if path is not None:
            files["ORT GenAI builder int4 b32"] = path
        print(f"builder: {note}")

    ppl = {"pytorch eager": perplexity(model, test)}
    for name, path in files.items():
        ppl[name] = onnx_perplexity(path, test)
        print(f"perplexity {name}: {ppl[name]:.3f}", flush=True)
    speeds = measure_generation({**files, "pytorch eager": model}, baseline="fp32", batches=(1,),
                                threads=(1, None) if all_threads else (1,), prompt_tokens=BLOCK, runs=runs)

    prompt = "def main():\n    "
    ids = np.array([tok(prompt, add_special_tokens=False)["input_ids"]])
    samples = {name: tok.decode(generate(files[name], ids, 24)[0, ids.shape[1]:].tolist())
               for name in ("fp32", "int4 GPTQ b32") if name in files}

    header = ["model", "file MB", "test perplexity", "vs fp32", "prefill 128 tok ms", "decode tok/s", "decode vs fp32",
              "quantized ops"]
    rows, results = [], []
    for threads in sorted({s.threads for s in speeds}):
        for name in [*files, "pytorch eager"]:
            s = next(x for x in speeds if x.name == name and x.threads == threads)
            size = file_bytes(files[name]) if name in files else None
            ops = nbits_ops(files[name]) if name in files else {}
            rows.append([f"{name} ({threads} thr)", f"{size / 2**20:.1f}" if size else "-", f"{ppl[name]:.3f}",
                         f"{ppl[name] / ppl['fp32']:.4f}", f"{s.prefill_ms:.1f}", f"{s.decode_tokens_per_s:.1f}",
                         f"{s.decode_speedup:.2f}x" if s.decode_speedup else "1.00x" if name == "fp32" else "-",
                         ", ".join(f"{k} {v}" for k, v in ops.items() if k != "MatMul") or "-"])
            results.append({**s.as_dict(), "file_bytes": size, "perplexity": ppl[name], "ops": ops})
    print()
    print(markdown_table(header, rows))
    print("\nnotes: " + "; ".join(f"{k}: {v}" for k, v in notes.items()))
    for name, text in samples.items():
        print(f"greedy continuation of {prompt!r} by {name}: {text!r}")
    print(f"\ntotal {time.time() - t_all:.0f}s")
    (out / "results.json").write_text(json.dumps({"machine": machine_info(), "params": params, "rows": results,
                                                  "notes": notes, "samples": samples, "test_blocks": len(test)}, indent=1))


if __name__ == "__main__":
    main()
