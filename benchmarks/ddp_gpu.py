"""GPU throughput of the image KD recipe: ResNet-50 teacher -> small CNN on synthetic 224 px images.

Distillation samples/s (the frozen ResNet-50 teacher's forward plus the student's step) for fp32 vs bf16
(channels_last on), and 1 vs all GPUs through torchrun when the machine has more than one. Run it on a
machine with CUDA GPUs; it exits with a message on one without:

    .venv/bin/python -m benchmarks.ddp_gpu [--epochs 3] [--samples 4096] [--batch 256]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml

from benchmarks.common import ROOT, machine_line, markdown_table


def recipe(samples: int, batch: int, epochs: int, precision: str) -> dict:
    train = {"epochs": epochs, "optimizer": {"name": "sgd", "lr": 0.01}, "keep": "last", "progress": False,
             "device": "cuda", "precision": precision, "channels_last": True}
    return {
        "name": "ddp_gpu", "seed": 0,
        "data": {"name": "synthetic", "num_samples": samples, "num_classes": 10, "shape": [3, 224, 224],
                 "batch_size": batch, "val_fraction": 0.0, "test_fraction": 0.05, "num_workers": 4},
        "teacher": {"name": "resnet50"},
        "model": {"name": "smallcnn"},
        "stages": [{"distill": {"teacher": "recipe", "cache_teacher": False, **train}}],
        "benchmark": {"batch_sizes": [1], "latency": False},
    }


def run(doc: dict, nproc: int, tmp: Path) -> float:
    path = tmp / "r.yaml"
    path.write_text(yaml.safe_dump(doc))
    out = tmp / f"run{nproc}"
    torchrun = Path(sys.executable).with_name("torchrun")
    subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", str(nproc), "-m", "compress", "run",
                    str(path), "--out", str(out), "--force"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["samples_per_s"] for r in rows if "samples_per_s" in r]
    return statistics.median(speeds[1:] or speeds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--samples", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=256)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: no CUDA GPU on this machine; run this benchmark where there is one")
    gpus = torch.cuda.device_count()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for precision in ("fp32", "bf16"):
            for n in sorted({1, gpus}):
                sps = run(recipe(args.samples, args.batch, args.epochs, precision), n, Path(tmp))
                rows.append([precision, n, f"{sps:,.0f}"])
                print(rows[-1], flush=True)
    print(markdown_table(["precision", "GPUs", "samples/s (distill, ResNet-50 teacher)"], rows))
    print(machine_line())


if __name__ == "__main__":
    main()
