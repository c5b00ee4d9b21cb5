"""Pruning on MNIST (8,000/2,000 split of the t10k set): unstructured magnitude vs channel pruning.

    .venv/bin/python -m benchmarks.prune_mnist            # full run (about 25 min on 1 busy core)
    .venv/bin/python -m benchmarks.prune_mnist --latency-only   # re-time the saved models of that run
    .venv/bin/python -m benchmarks.prune_mnist --smoke    # synthetic data, seconds: checks the script

For LeNet-5 4x wide and small_resnet: train a baseline, then (a) global magnitude pruning to 95%
sparsity and (b) channel pruning with torch-pruning, both iterative (AGP) with KD fine-tuning from the
unpruned model. Latency: ONNX Runtime CPU, batch 32, 1 thread, baseline and pruned timed interleaved
in this process (compress.measure), median thread CPU time of many runs (wall clock also saved).
"""
from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import ROOT, data_dir, machine_line, markdown_table
from compress import (PruneConfig, TrainConfig, create_data, create_model, evaluate, load_model, prune, save_model,
                      train)
from compress.measure.size import count_macs
from compress.utils import seed_everything

MODELS = {
    "lenet5": {"name": "lenet5", "width": 4},
    "small_resnet": {"name": "small_resnet", "widths": [32, 64, 128]},
}
RESULTS = ROOT / "benchmarks" / "results"
CHANNEL_RATIO = {"lenet5": 0.6, "small_resnet": 0.55}


def train_cfg(epochs: int, lr: float) -> TrainConfig:
    return TrainConfig(epochs=epochs, optimizer={"name": "adam", "lr": lr}, scheduler={"name": "cosine"},
                       augment={"random_shift": 1}, progress=False)


def ort_latency(models: dict, x: torch.Tensor, runs: int, warmup: int, threads: int = 1) -> dict[str, dict]:
    """ONNX Runtime ms per batch-32 call, all models interleaved (compress.measure): median of the
    calling thread's CPU time (1 intra-op thread computes on the caller), wall-clock median beside it."""
    from compress.runtime.backends import onnx_timer
    from compress.runtime.onnx import onnx_session, to_onnx
    from compress.runtime.timing import time_interleaved

    with tempfile.TemporaryDirectory() as d:
        timers = {n: onnx_timer(onnx_session(to_onnx(copy.deepcopy(m), x, Path(d) / f"{n}.onnx"), threads), x)
                  for n, m in models.items()}
        stats = time_interleaved(timers, runs, warmup, min_sample_ms=2.0, clock="cpu")
    return {n: {"cpu_ms": s["median_ms"], "wall_ms": s["wall_median_ms"]} for n, s in stats.items()}


def run_model(key: str, data, args) -> dict:
    spec = MODELS[key]
    seed_everything(0)
    base = create_model(spec, data.input_shape, data.num_outputs)
    t0 = time.time()
    train(base, train_cfg(args.epochs, 2e-3), data)
    base_acc = evaluate(base, data, "test")["accuracy"]
    print(f"[{key}] baseline test accuracy {100 * base_acc:.2f}% ({time.time() - t0:.0f}s)", flush=True)
    example = data.example_input(1)
    base_macs, base_params = count_macs(base, example)
    ft = train_cfg(args.ft_epochs, 5e-4)
    final = train_cfg(args.final_epochs if args.final_epochs is not None else args.ft_epochs, 5e-4)
    kd = {"temperature": 4.0, "alpha": args.kd_alpha}  # alpha: weight of the hard-label loss
    steps = {"magnitude": args.mag_steps or args.steps, "channel": args.steps}
    ratio = args.channel_ratio if args.channel_ratio is not None else CHANNEL_RATIO[key]
    out = {"model": key, "spec": spec, "baseline": {"accuracy": base_acc, "val_accuracy": evaluate(base, data, "val")["accuracy"],
                                                    "macs": base_macs, "params": base_params}}

    configs = {
        "magnitude": PruneConfig(method="magnitude", sparsity=args.sparsity, scope="global", steps=steps["magnitude"],
                                 schedule="agp", finetune=ft, final_finetune=final, kd=kd),
        "channel": PruneConfig(method="channel", sparsity=ratio, scope="layer", importance="l2", round_to=args.round_to,
                               steps=steps["channel"], schedule="agp", finetune=ft, final_finetune=final, kd=kd),
    }
    pruned = {}
    for method, cfg in configs.items():
        if method not in args.methods.split(","):
            continue
        seed_everything(1)
        t0 = time.time()
        model, metrics = prune(copy.deepcopy(base), cfg, data)
        pruned[method] = model
        metrics["seconds"] = round(time.time() - t0, 1)
        metrics["val_accuracy"] = evaluate(model, data, "val")["accuracy"]  # what settings may be chosen on
        out[method] = metrics
        print(f"[{key}] {method}: test accuracy {100 * metrics['accuracy']:.2f}%, {metrics['macs_reduction']}x MACs, "
              f"{metrics['nonzero']:,}/{metrics['params']:,} non-zero ({metrics['seconds']}s)", flush=True)
    x = data.example_input(32)
    RESULTS.mkdir(parents=True, exist_ok=True)
    torch.save(x, RESULTS / f"{args.tag}_input.pt")
    for n, m in {"baseline": base, **pruned}.items():  # kept so --latency-only can re-time without training
        save_model(m, RESULTS / f"{args.tag}_{key}_{n}.pt")
    lat = ort_latency({"baseline": base, **pruned}, x, args.runs, args.warmup, args.threads)
    out["latency_ms_b32"] = {n: v["cpu_ms"] for n, v in lat.items()}
    out["latency_wall_ms_b32"] = {n: v["wall_ms"] for n, v in lat.items()}
    out["speedup"] = {n: lat["baseline"]["cpu_ms"] / v["cpu_ms"] for n, v in lat.items()}
    out["speedup_wall"] = {n: lat["baseline"]["wall_ms"] / v["wall_ms"] for n, v in lat.items()}
    return out


def retime(args) -> None:
    """Re-time the saved models of an earlier run (ONNX Runtime only) and print the latency table."""
    saved = json.loads((RESULTS / f"{args.tag}.json").read_text())
    x = torch.load(RESULTS / f"{args.tag}_input.pt", weights_only=True)
    rows = []
    for r in saved["results"]:
        names = ["baseline"] + [m for m in ("magnitude", "channel") if m in r]
        models = {n: load_model(RESULTS / f"{args.tag}_{r['model']}_{n}.pt") for n in names}
        lat = ort_latency(models, x, args.runs, args.warmup, args.threads)
        for n in names:
            rows.append([r["model"], n, f"{lat[n]['cpu_ms']:.3f}", f"{lat['baseline']['cpu_ms'] / lat[n]['cpu_ms']:.2f}x",
                         f"{lat[n]['wall_ms']:.3f}", f"{lat['baseline']['wall_ms'] / lat[n]['wall_ms']:.2f}x"])
    print(markdown_table(["model", "method", "ORT CPU-time ms (b32)", "speedup", "wall ms", "speedup (wall)"], rows))
    print()
    print(machine_line())


def tables(results: list[dict]) -> str:
    rows = []
    for r in results:
        b = r["baseline"]
        rows.append([r["model"], "baseline", "0%", f"{100 * b['accuracy']:.2f}", "-", f"{100 * b['val_accuracy']:.2f}", f"{b['params']:,}", f"{b['params']:,}",
                     f"{b['macs'] / 1e6:.2f}M", "1.00x", f"{r['latency_ms_b32']['baseline']:.2f}", "1.00x",
                     f"{4 * b['params'] / 1024:.0f}"])
        for method in ("magnitude", "channel"):
            if method not in r:
                continue
            m = r[method]
            amount = f"{100 * m['weight_sparsity']:.1f}% weights" if method == "magnitude" else f"{100 * m['channel_ratio']:.0f}% channels"
            lat = f"{r['latency_ms_b32'][method]:.2f}"
            speed = f"{r['speedup'][method]:.2f}x"
            rows.append([r["model"], method, amount, f"{100 * m['accuracy']:.2f}", f"{100 * (b['accuracy'] - m['accuracy']):+.2f}",
                         f"{100 * m['val_accuracy']:.2f} ({100 * (b['val_accuracy'] - m['val_accuracy']):+.2f})",
                         f"{m['params']:,}", f"{m['nonzero']:,}", f"{m['macs'] / 1e6:.2f}M", f"{m['macs_reduction']:.2f}x",
                         lat, speed, f"{m['sparse_bytes'] / 1024:.0f}"])
    main = markdown_table(["model", "method", "removed", "test acc %", "drop (pts)", "val acc % (drop)", "params", "non-zero", "MACs",
                           "MACs x fewer", "ORT CPU ms (b32)", "speedup", "sparse KiB"], rows)
    curve = []
    for r in results:
        for method in ("magnitude", "channel"):
            if method not in r:
                continue
            for s in r[method]["steps"]:
                amount = s["weight_sparsity"] if method == "magnitude" else s["target"]
                curve.append([r["model"], method, s["step"], f"{100 * amount:.1f}%", f"{100 * s['test_accuracy']:.2f}",
                              f"{r['baseline']['macs'] / s['macs']:.2f}x"])
            curve.append([r["model"], method, "final", "", f"{100 * r[method]['accuracy']:.2f}", f"{r[method]['macs_reduction']:.2f}x"])
    acc = markdown_table(["model", "method", "step", "sparsity / channels removed", "test acc %", "MACs x fewer"], curve)
    return main + "\n\nAccuracy vs sparsity (after each step's fine-tuning; 'final' after the last fine-tune):\n\n" + acc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="lenet5,small_resnet")
    ap.add_argument("--methods", default="magnitude,channel")
    ap.add_argument("--resnet-widths", default="32,64,128", help="small_resnet channels per stage")
    ap.add_argument("--epochs", type=int, default=8, help="baseline training epochs")
    ap.add_argument("--ft-epochs", type=int, default=2, help="fine-tune epochs per pruning step (and at the end)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--mag-steps", type=int, default=None, help="AGP steps for magnitude pruning (default --steps)")
    ap.add_argument("--final-epochs", type=int, default=None, help="final fine-tune epochs (default --ft-epochs)")
    ap.add_argument("--kd-alpha", type=float, default=0.5, help="weight of the hard-label loss in KD fine-tuning")
    ap.add_argument("--channel-ratio", type=float, default=None, help="channels removed per layer (default per model)")
    ap.add_argument("--round-to", type=int, default=None, help="keep pruned channel counts multiples of this")
    ap.add_argument("--sparsity", type=float, default=0.95)
    ap.add_argument("--runs", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1, help="torch and ONNX Runtime intra-op threads")
    ap.add_argument("--tag", default="prune_mnist", help="name of the results file in benchmarks/results/")
    ap.add_argument("--latency-only", action="store_true", help="re-time the models saved by the run named --tag")
    ap.add_argument("--smoke", action="store_true", help="tiny synthetic data, 1 epoch: checks the script only")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    MODELS["small_resnet"]["widths"] = [int(w) for w in args.resnet_widths.split(",")]
    if args.latency_only:
        return retime(args)
    if args.smoke:
        data = create_data({"name": "synthetic", "num_samples": 256, "shape": [1, 28, 28], "num_classes": 10, "noise": 0.3})
        args.epochs, args.ft_epochs, args.steps, args.runs, args.warmup = 1, 1, 2, 5, 1
        args.tag += "_smoke"
    else:
        root = data_dir() / "mnist-t10k"
        data = create_data({"name": "mnist", "root": str(root), "test_size": 2000, "batch_size": 64})
    results = [run_model(k, data, args) for k in args.models.split(",")]
    text = tables(results)
    print(text)
    print()
    print(machine_line())
    out = RESULTS / f"{args.tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "machine": machine_line(), "results": results}, indent=2, default=str))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
