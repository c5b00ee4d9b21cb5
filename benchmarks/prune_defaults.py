"""Channel pruning at its defaults (issue 25): torchvision resnet18 on 32 px MNIST, half the MACs, self-distilling
fine-tune vs plain fine-tuning.

    .venv/bin/python -m benchmarks.prune_defaults [--seeds 0,1,2] [--epochs 4] [--no-latency]
    .venv/bin/python -m benchmarks.prune_defaults --smoke     # synthetic data, seconds: checks the script

Per seed: train resnet18 (one input channel, resized to 32 px inside the model, as
recipes/mnist_resnet18_chain.yaml's teacher) from scratch on the 8,000/2,000 split of the MNIST t10k set, then
prune copies of it with ``{method: channel, budget: {kind: macs, reduction: 2}}`` and nothing else (round_to
from the latency backends, one step shrunk to land on the budget, the default fine-tune: 3 epochs, Adam 3e-4, cosine) -- once as shipped
(self-distillation from the unpruned model) and once with ``kd: false`` (plain fine-tuning). Prints validation
accuracy lost against the unpruned model (what a choice of default may look at: the 800 validation images carved
from the 8,000), test accuracy lost (read once, to report) and the ONNX Runtime batch-32 speed-up (1 thread, interleaved).
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import ROOT, data_dir, machine_line, markdown_table
from benchmarks.prune_mnist import ort_latency
from compress import PruneConfig, TrainConfig, create_data, create_model, evaluate, prune, train
from compress.utils import seed_everything

MODEL = {"name": "torchvision:resnet18", "in_chans": 1, "adapt_input": {"size": [32, 32]}}
PRUNE = {"method": "channel", "budget": {"kind": "macs", "reduction": 2}}
DEFAULT_FT = {"epochs": 3, "optimizer": {"name": "adam", "lr": 3e-4}, "scheduler": {"name": "cosine"}, "progress": False}
ONE_EPOCH = {"epochs": 1, "progress": False}  # the earlier default fine-tune (Adam 1e-3, constant)
VARIANTS = {"self-distill (default)": {"finetune": DEFAULT_FT}, "plain (kd: false)": {"kd": False, "finetune": DEFAULT_FT}}
# --candidates: other fine-tunes, measured beside the shipped one (here: the earlier default)
CANDIDATES = {"self-distill, 1 epoch Adam 1e-3 (earlier default)": {"finetune": ONE_EPOCH},
              "plain, 1 epoch Adam 1e-3 (earlier default)": {"kd": False, "finetune": ONE_EPOCH}}


def run_seed(seed: int, data, args) -> dict:
    seed_everything(seed)
    base = create_model(MODEL, data.input_shape, data.num_outputs)
    t0 = time.time()
    train(base, TrainConfig(epochs=args.epochs, optimizer={"name": "adamw", "lr": 2e-3, "weight_decay": 0.01},
                            scheduler={"name": "cosine"}, augment={"random_shift": 2}, progress=False), data)
    out = {"seed": seed, "baseline": evaluate(base, data, "test")["accuracy"],
           "baseline_val": evaluate(base, data, "val")["accuracy"], "train_s": round(time.time() - t0)}
    print(f"[seed {seed}] baseline test accuracy {100 * out['baseline']:.2f}% ({out['train_s']} s)", flush=True)
    models = {"baseline": base}
    for name, extra in {**VARIANTS, **(CANDIDATES if args.candidates else {})}.items():
        seed_everything(1000 + seed)  # both variants fine-tune from the same state with the same batches
        t0 = time.time()
        model, m = prune(copy.deepcopy(base), PruneConfig(**PRUNE, **extra), data)
        models[name] = model
        out[name] = {"accuracy": m["accuracy"], "val_accuracy": evaluate(model, data, "val")["accuracy"],
                     "macs_reduction": m["macs_reduction"], "fine_tune": m["fine_tune"],
                     "round_to": m.get("round_to"), "seconds": round(time.time() - t0)}
        print(f"[seed {seed}] {name}: test accuracy {100 * m['accuracy']:.2f}% "
              f"({100 * (out['baseline'] - m['accuracy']):+.2f} points lost), {m['macs_reduction']}x fewer MACs", flush=True)
    if not args.no_latency:
        lat = ort_latency(models, data.example_input(32), args.runs, 5)
        out["speedup_b32"] = {n: round(lat["baseline"]["cpu_ms"] / lat[n]["cpu_ms"], 2) for n in models if n != "baseline"}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--epochs", type=int, default=4, help="baseline training epochs (the chain recipe's teacher: 4)")
    ap.add_argument("--runs", type=int, default=50, help="interleaved ORT timings per model")
    ap.add_argument("--no-latency", action="store_true")
    ap.add_argument("--candidates", action="store_true", help="also the candidate default fine-tunes (CANDIDATES)")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "prune_defaults.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.smoke:
        data = create_data({"name": "synthetic", "num_samples": 128, "shape": [1, 28, 28], "num_classes": 10})
        args.epochs, args.runs = 1, 5
    else:
        data = create_data({"name": "mnist", "root": str(data_dir() / "mnist-t10k"), "test_size": 2000,
                            "val_fraction": 0.1, "batch_size": 64})
    results = [run_seed(int(s), data, args) for s in args.seeds.split(",")]
    rows = []
    for name in [n for n in {**VARIANTS, **CANDIDATES} if n in results[0]]:
        lost = [100 * (r["baseline"] - r[name]["accuracy"]) for r in results]
        speed = [r["speedup_b32"][name] for r in results if "speedup_b32" in r]
        val_lost = [100 * (r["baseline_val"] - r[name]["val_accuracy"]) for r in results]
        rows.append([name, ", ".join(f"{x:+.2f}" for x in val_lost), f"{statistics.mean(val_lost):+.2f}",
                     ", ".join(f"{x:+.2f}" for x in lost), f"{statistics.mean(lost):+.2f}",
                     ", ".join(f"{r[name]['macs_reduction']}x" for r in results),
                     ", ".join(f"{x:.2f}x" for x in speed) or "-"])
    print()
    print(markdown_table(["fine-tune", "val points lost per seed", "val mean", "test points lost per seed", "test mean", "MACs fewer", "ORT b32 speed-up"], rows))
    print(f"\nresnet18 32 px, MNIST t10k 8,000/2,000 split, {args.epochs} baseline epochs, seeds {args.seeds}; {machine_line()}")
    if not args.smoke:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": vars(args), "machine": machine_line(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
