"""Decoder LMs on real offline text: the running Python's standard library, through compress's LM stages.

    .venv/bin/python -m benchmarks.lm_stdlib                        # reduced scale, seeds 0 1 2
    .venv/bin/python -m benchmarks.lm_stdlib --seeds 0 --preset reduced
    .venv/bin/python -m benchmarks.lm_stdlib --preset issue         # issue 28's ~20M-parameter teacher (hours on 2 cores)

Rows per seed (one fixed split of the corpus by file, ``split_seed`` 0; the seed moves initialisation and order):
  teacher      a Llama-style decoder trained from scratch
  (b) scratch  the smaller student architecture trained from scratch, as many epochs (tokens) as (KD)
  (KD)         the same student distilled from the teacher (forward KL per token, chunked; hard labels too)
With ``--prune`` (the (KD) row is left out to keep the run's time; (b) then has the pruned architecture):
  (a) prune+KD the teacher pruned Minitron-style (``prune: {method: decoder}``: half the layers, key-value
               groups, MLP neurons and hidden channels as the split, scaled until a third of the parameters is
               left; widths multiples of 32 for int4 groups), fine-tuned with token KD from the unpruned teacher
  (c) prune    the same pruning, fine-tuned on the next-token loss alone
  (b) scratch  (a)'s architecture (its pruned config) trained from scratch on as many tokens as (a) fine-tunes
  (d) int4     GPTQ and RTN (round to nearest), group-wise int4 weights of (a) when it exists, else of (KD)
Columns: parameters, checkpoint size, test perplexity (exp of the mean token NLL over every test token,
non-overlapping blocks), next-token accuracy, PyTorch tokens/s at batch 1 (one block, 1 thread, medians
timed interleaved across the rows in one process: compare them as ratios).
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn

from benchmarks.common import ROOT, machine_line, markdown_table

OUT = ROOT / "runs" / "lm_stdlib"


def prune_decoder(teacher: nn.Module, data, p: dict, kd: bool) -> tuple[nn.Module, dict]:
    """The prune stage's function with the decoder method: one step to a third of the parameters, then
    ``student_epochs`` of fine-tuning at ``prune_lr`` (KD from the unpruned teacher: token_kl at T = 1, half
    next-token loss; or plain). Returns the pruned model and the stage's facts."""
    from compress.pruning.decoder import DecoderPruneConfig
    from compress.stages.prune import prune

    cfg = DecoderPruneConfig(depth=0.5, heads=0.5, mlp=0.5, hidden=0.5, multiple_of=32, sparsity=0.5, steps=1,
                             budget={"kind": "params", "reduction": 3},
                             finetune=train_config(p["student_epochs"], p["prune_lr"]),
                             **({"kd": {"teacher": "unpruned", "temperature": 1.0, "alpha": 0.5}} if kd else {"kd": False}))
    model, facts = prune(teacher, cfg, data)
    return model, facts


# PRUNE(teacher, data, preset, kd: bool) -> (pruned model, facts): fine-tuned with KD from the unpruned teacher
# when kd is true, with hard labels only otherwise.
PRUNE: Optional[Callable[..., tuple[nn.Module, dict]]] = prune_decoder

PRESETS = {
    # ~11 minutes on 2 shared cores: a 1.3M-parameter teacher, a 0.36M student, 50 stdlib files (~0.2M training
    # tokens). The teacher gets more epochs and a lower LR: at 3e-3 and 2 epochs over 80 files it ended at
    # test perplexity 152 against the from-scratch student's 84 (a 1-epoch probe: val 195 at 3e-3, 164 at 1e-3)
    "reduced": {"max_files": 50, "block_size": 128, "batch_size": 8, "vocab_size": 2048, "teacher_epochs": 3,
                "student_epochs": 2, "teacher_lr": 1e-3, "student_lr": 3e-3, "prune_lr": 1e-3,
                "teacher": {"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
                            "num_key_value_heads": 2, "intermediate_size": 384},
                "student": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                            "num_key_value_heads": 2, "intermediate_size": 192}},
    # issue 28's scale: a ~22M-parameter teacher on the whole corpus, a student of about a third
    "issue": {"max_files": None, "block_size": 256, "batch_size": 16, "vocab_size": 8192, "teacher_epochs": 4,
              "student_epochs": 4, "teacher_lr": 1e-3, "student_lr": 2e-3, "prune_lr": 1e-3,
              "teacher": {"hidden_size": 384, "num_hidden_layers": 10, "num_attention_heads": 6,
                          "num_key_value_heads": 2, "intermediate_size": 1024},
              "student": {"hidden_size": 256, "num_hidden_layers": 6, "num_attention_heads": 4,
                          "num_key_value_heads": 2, "intermediate_size": 640}},
}


def data_spec(p: dict) -> dict:
    return {"name": "lm", "root": "stdlib", "files": "**/*.py", "max_files": p["max_files"],
            "block_size": p["block_size"], "batch_size": p["batch_size"], "eval_batch_size": 16,
            "tokenizer": {"train": "bpe", "vocab_size": p["vocab_size"]}}


def model_spec(sizes: dict, vocab: int, block: int) -> dict:
    return {"name": "hf", "config": {"model_type": "llama", "vocab_size": vocab, "max_position_embeddings": block,
                                     "tie_word_embeddings": False, **sizes}}


def train_config(epochs: int, lr: float):
    from compress.trainer import TrainConfig

    return TrainConfig(epochs=epochs, progress=False, grad_clip=1.0, keep="last",
                       optimizer={"name": "adamw", "lr": lr, "weight_decay": 0.01}, scheduler={"name": "cosine"})


def size_bytes(model: nn.Module) -> int:
    from compress.checkpoint import save_model

    with tempfile.TemporaryDirectory() as d:
        return save_model(model, Path(d) / "m.pt").stat().st_size


def params(model: nn.Module) -> int:
    """Weights as the float model holds them (a packed layer counts its original shape)."""
    from compress.quant.qat import quant_layers

    packed = sum(torch.Size(m.weight_shape).numel() for m in quant_layers(model) if m.packed)
    return packed + sum(p.numel() for p in model.parameters())


@torch.no_grad()
def tokens_per_second(models: dict[str, nn.Module], x, rounds: int = 30) -> dict[str, float]:
    """Batch-1 forward of one block, medians over ``rounds`` interleaved across the models."""
    times: dict[str, list[float]] = {k: [] for k in models}
    for m in models.values():
        m.eval()
        m(x)  # warm-up
    for _ in range(rounds):
        for k, m in models.items():
            t = time.perf_counter()
            m(x)
            times[k].append(time.perf_counter() - t)
    tokens = x["input_ids"].numel()
    return {k: tokens / statistics.median(v) for k, v in times.items()}


def run_seed(seed: int, p: dict, data, prune: bool) -> list[dict]:
    from compress.evaluation import evaluate
    from compress.models import create_model
    from compress.quant.methods import QuantizeConfig
    from compress.stages.distill import DistillConfig, distill
    from compress.stages.quantize import quantize
    from compress.trainer import Trainer
    from compress.utils import seed_everything

    vocab, block = data.vocab_size, p["block_size"]
    build = lambda which: create_model(model_spec(p[which], vocab, block), data.input_shape, vocab, data_task="lm")  # noqa: E731
    models, seconds = {}, {}

    def timed(name, fn):
        t = time.time()
        models[name] = fn()
        seconds[name] = time.time() - t
        print(f"  seed {seed} {name}: {seconds[name]:.0f} s", flush=True)

    seed_everything(seed)
    teacher = build("teacher")
    timed("teacher", lambda: (Trainer(teacher, train_config(p["teacher_epochs"], p["teacher_lr"]), data).fit(), teacher)[1])
    student = dict(p["student"])
    source = "(KD) student distilled"
    facts = {}
    if prune:
        if PRUNE is None:
            raise SystemExit("error: --prune: no pruning method is wired in (benchmarks/lm_stdlib.py PRUNE)")
        for name, kd in (("(a) pruned + KD", True), ("(c) pruned, no KD", False)):
            seed_everything(seed)
            timed(name, lambda: PRUNE(copy.deepcopy(teacher), data, p, kd=kd))
            models[name], facts[name] = models[name]
        s = facts["(a) pruned + KD"]["lm_sizes"]
        student = {"hidden_size": s["hidden"], "num_hidden_layers": s["layers"], "num_attention_heads": s["heads"],
                   "num_key_value_heads": s["kv_heads"], "intermediate_size": s["intermediate"], "head_dim": s["head_dim"]}
        print(f"  seed {seed} pruned sizes {s} (from {facts['(a) pruned + KD']['lm_sizes_before']}); (b) gets them",
              flush=True)
        source = "(a) pruned + KD"
    seed_everything(seed)
    scratch = create_model(model_spec(student, vocab, block), data.input_shape, vocab, data_task="lm")
    timed("(b) student from scratch",
          lambda: (Trainer(scratch, train_config(p["student_epochs"], p["student_lr"]), data).fit(), scratch)[1])
    if not prune:
        seed_everything(seed)
        kd = build("student")
        kd_cfg = DistillConfig(**train_config(p["student_epochs"], p["student_lr"]).model_dump(exclude={"loss"}),
                               temperature=1.0, alpha=0.5)
        timed("(KD) student distilled", lambda: distill(kd, teacher, kd_cfg, data).model)
    for method in ("gptq", "weight_only"):
        cfg = QuantizeConfig(method=method, bits=4, group_size=32)
        label = f"(d) int4 g32 {'GPTQ' if method == 'gptq' else 'RTN'} of {source.split(' ')[0]}"
        timed(label, lambda: quantize(copy.deepcopy(models[source]), cfg, data).model)
    x = data.example_input(1)
    speed = tokens_per_second(models, x)
    rows = []
    for name, m in models.items():
        met = evaluate(m, data, "test")
        rows.append({"seed": seed, "row": name, "params": params(m), "size_bytes": size_bytes(m),
                     "perplexity": met["perplexity"], "accuracy": met["accuracy"], "tokens_per_s": speed[name],
                     "seconds": round(seconds[name], 1)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="reduced")
    ap.add_argument("--max-files", type=int, help="override the preset's number of stdlib files")
    ap.add_argument("--epochs", type=int, help="override the preset's teacher and student epochs")
    ap.add_argument("--prune", action="store_true", help="add rows (a) prune+KD and (c) prune without KD (needs PRUNE)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=OUT / "results.json", help="where the rows go (JSON)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from compress.data import create_data

    p = dict(PRESETS[args.preset])
    if args.max_files:
        p["max_files"] = args.max_files
    if args.epochs:
        p["student_epochs"] = args.epochs
        p["teacher_epochs"] = args.epochs + PRESETS[args.preset]["teacher_epochs"] - PRESETS[args.preset]["student_epochs"]
    started = time.time()
    data = create_data(data_spec(p))
    d = data.description
    print(f"corpus: {d['corpus']}: {d['documents']} files, tokens train/val/test {d['split_tokens']}, "
          f"vocabulary {d['vocab_size']}, blocks of {d['block_size']}")
    rows = []
    for seed in args.seeds:
        rows += run_seed(seed, p, data, args.prune)
    header = ["seed", "row", "params", "size", "test perplexity", "next-token acc.", "PyTorch tokens/s (b1)", "stage s"]
    table = [[r["seed"], r["row"], f"{r['params']:,}", f"{r['size_bytes'] / 2**20:.2f} MiB", f"{r['perplexity']:.2f}",
              f"{100 * r['accuracy']:.1f}%", f"{r['tokens_per_s']:,.0f}", r["seconds"]] for r in rows]
    print(markdown_table(header, table))
    print(f"Python {d['python']} standard library; preset {args.preset}; {machine_line()}; "
          f"{time.time() - started:.0f} s in all")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"preset": p, "data": d, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
