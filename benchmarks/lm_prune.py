"""Minitron-style pruning of a small Llama at equal parameters: which importance keeps the most (issue 28).

    .venv/bin/python -m benchmarks.lm_prune [--seeds 0] [--train-steps 300] [--ft-steps 40]
    .venv/bin/python -m benchmarks.lm_prune --smoke      # seconds: checks the script

A Llama (4 layers, hidden 128, 4 heads in 2 key-value groups, MLP 384, byte tokens; 0.85M parameters) is trained
from scratch for ``--train-steps`` steps (batch 16 x 128 bytes) on the top-level ``.py`` files of the running interpreter's standard
library (found through ``sysconfig``; files split 80/10/10 into train/val/test by a seeded shuffle; test is not
read). Copies of it are then cut to a third of the parameters with ``prune_lm`` -- the same width+depth split
(``depth 0.25, heads 0.5, mlp 0.5, hidden 0.25``, scaled to land on ``budget: {kind: params, reduction: 3}``),
so every row has the same sizes -- ranking heads/neurons/channels by activation (Minitron), weight magnitude,
or at random, layers by the NLL change of skipping each (or block cosine). Each is scored on the validation
blocks right after pruning and after ``--ft-steps`` of fine-tuning on the training blocks with logit KD
from the unpruned model (forward KL, T=1; Minitron's retraining), one row also with the plain LM loss.
"""
from __future__ import annotations

import argparse
import copy
import glob
import json
import math
import random
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import ROOT, machine_line, markdown_table
from compress.pruning.decoder import prune_lm, token_nll

SPLIT = {"depth": 0.25, "heads": 0.5, "mlp": 0.5, "hidden": 0.25, "budget": {"kind": "params", "reduction": 3}}
ROWS = {  # name -> (importance, depth importance, KD in the fine-tune)
    "activation (Minitron), KD": ("activation", "nll", True),
    "magnitude, KD": ("magnitude", "nll", True),
    "random, KD": ("random", "nll", True),
    "activation, cosine depth, KD": ("activation", "cosine", True),
    "activation, plain LM loss": ("activation", "nll", False),
}


def corpus(seed: int, block: int) -> dict[str, torch.Tensor]:
    """Byte blocks of the stdlib's top-level .py files, split by file."""
    files = sorted(glob.glob(str(Path(sysconfig.get_paths()["stdlib"]) / "*.py")))
    random.Random(seed).shuffle(files)
    n = len(files)
    parts = {"train": files[: int(0.8 * n)], "val": files[int(0.8 * n): int(0.9 * n)]}
    out = {}
    for split, names in parts.items():
        data = b"".join(Path(f).read_bytes() + b"\n" for f in names)
        t = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
        out[split] = t[: len(t) // block * block].view(-1, block)
    return out


def model(seed: int, small: bool):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64 if small else 128, intermediate_size=128 if small else 384,
                                   num_hidden_layers=4, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False)
    return transformers.AutoModelForCausalLM.from_config(cfg)


def lm_loss(m, x):
    logits = m(x).logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))


def train(m, blocks, *, steps: int, lr=2e-3, batch=16, teacher=None, seed=0) -> int:
    """AdamW with a cosine decay for ``steps``; KD from ``teacher`` when given."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.01)
    m.train()
    total, i = steps, 0
    while i < total:
        x = blocks[torch.randint(0, len(blocks), (batch,), generator=g)]
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * i / total))
        if teacher is None:
            loss = lm_loss(m, x)
        else:
            with torch.no_grad():
                t = teacher(x).logits
            s = m(x).logits
            loss = F.kl_div(F.log_softmax(s, -1).flatten(0, 1), F.log_softmax(t, -1).flatten(0, 1), log_target=True,
                            reduction="batchmean")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        i += 1
    m.eval()
    return i


def val_nll(m, blocks, batch=32) -> float:
    return token_nll(m, [blocks[i: i + batch] for i in range(0, len(blocks), batch)])


def run_seed(seed: int, args) -> dict:
    data = corpus(seed, args.block)
    val = data["val"][: args.val_blocks]
    base = model(seed, args.smoke)
    t0 = time.time()
    steps = train(base, data["train"], steps=args.train_steps, seed=seed)
    out = {"seed": seed, "train_steps": steps, "train_s": round(time.time() - t0), "params": sum(p.numel() for p in base.parameters()),
           "unpruned_val_nll": val_nll(base, val)}
    print(f"[seed {seed}] teacher: {out['params']:,} params, {steps} steps in {out['train_s']} s, val NLL "
          f"{out['unpruned_val_nll']:.4f} nats/byte", flush=True)
    g = torch.Generator().manual_seed(10_000 + seed)
    calib = [data["train"][torch.randint(0, len(data["train"]), (16,), generator=g)] for _ in range(args.calib)]
    for name, (importance, depth, kd) in ROWS.items():
        pruned, facts = prune_lm(copy.deepcopy(base), {**SPLIT, "importance": importance, "depth_importance": depth}, calib)
        row = {"sizes": facts["lm_sizes"], "params": facts["params"], "layers_kept": facts["layers_kept"],
               "pruned_val_nll": val_nll(pruned, val)}
        train(pruned, data["train"], steps=args.ft_steps, lr=1e-3, teacher=base.eval() if kd else None, seed=seed + 1)
        row["finetuned_val_nll"] = val_nll(pruned, val)
        out[name] = row
        print(f"[seed {seed}] {name}: {row['params']:,} params {row['sizes']}, layers {row['layers_kept']}: val NLL "
              f"{row['pruned_val_nll']:.4f} pruned, {row['finetuned_val_nll']:.4f} after {args.ft_steps} steps", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0")
    p.add_argument("--train-steps", type=int, default=300)
    p.add_argument("--ft-steps", type=int, default=40)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--val-blocks", type=int, default=256)
    p.add_argument("--calib", type=int, default=4, help="calibration batches of 16 blocks")
    # 1: on the 2 shared cores of the machine this was run on, 2 threads ran 4-6x slower than 1 (load 8-12)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--smoke", action="store_true", help="a tiny model and a few steps: checks the script")
    p.add_argument("--out", default=None, help="default: runs/bench_lm_prune_s<seeds>.json")
    args = p.parse_args()
    if args.smoke:
        args.train_steps, args.ft_steps, args.val_blocks, args.calib = 5, 3, 16, 1
    torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    results = [run_seed(int(s), args) for s in args.seeds.split(",")]
    rows = []
    for name in ROWS:
        pr = [r[name]["pruned_val_nll"] for r in results]
        ft = [r[name]["finetuned_val_nll"] for r in results]
        rows.append([name, f"{results[0][name]['params']:,}", ", ".join(f"{v:.3f}" for v in pr),
                     ", ".join(f"{v:.3f}" for v in ft)])
    base = ", ".join(f"{r['unpruned_val_nll']:.3f}" for r in results)
    print()
    print(f"unpruned: {results[0]['params']:,} params, val NLL {base} nats/byte (seeds {args.seeds}); "
          f"{results[0]['train_steps']} training steps in {results[0]['train_s']} s")
    print(markdown_table(["importance (width), depth, fine-tune", "params", "val NLL pruned",
                          f"val NLL after {args.ft_steps} steps"], rows))
    print(machine_line())
    out = Path(args.out or ROOT / "runs" / f"bench_lm_prune_s{args.seeds.replace(',', '_')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
