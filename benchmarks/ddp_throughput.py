"""Data-parallel scaling on CPU: training samples/s of 1 vs 2 torchrun processes (1 torch thread each).

Each case is one ``train`` stage run through ``torchrun --nproc-per-node N -m compress run`` with the same
global batch; samples/s is the median over the epochs after the first (from metrics.jsonl, all ranks'
samples). Cases: the quickstart's teacher (MLP 64-512-512-10 on digits, batch 64) and a 4x-wide LeNet-5 on
MNIST (batch 128). Target: ratio >= 1.6 on 2 cores. 1- and 2-process runs alternate for ``--rounds``.

    .venv/bin/python -m benchmarks.ddp_throughput [--rounds 3] [--epochs 4]
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

import yaml

from benchmarks.common import ROOT, data_dir, machine_line, markdown_table

CASES = {
    "quickstart teacher (MLP 512x512, digits, batch 64)": {
        "data": {"name": "digits", "batch_size": 64},
        "model": {"name": "mlp", "hidden": [512, 512], "dropout": 0.2}},
    "LeNet-5 4x (MNIST 10k, batch 128)": {
        "data": {"name": "mnist", "root": "${COMPRESS_DATA_DIR}/mnist-t10k", "batch_size": 128},
        "model": {"name": "lenet5", "width": 4}},
}


def samples_per_s(recipe: Path, nproc: int, out: Path) -> float:
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", str(nproc), "-m", "compress", "run",
                    str(recipe), "--out", str(out), "--force", "--threads", "1"],
                   cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["samples_per_s"] for r in rows if "samples_per_s" in r]
    return statistics.median(speeds[1:] or speeds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--only", help="run only the cases whose name contains this")
    args = ap.parse_args()
    data_dir()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, case in CASES.items():
            if args.only and args.only not in name:
                continue
            recipe = Path(tmp) / "r.yaml"
            recipe.write_text(yaml.safe_dump({
                "name": "ddp_bench", "seed": 0, **case,
                "stages": [{"train": {"epochs": args.epochs, "optimizer": {"name": "sgd", "lr": 0.01},
                                      "keep": "last", "progress": False}}],
                "benchmark": {"batch_sizes": [1], "latency": False}}))
            one, two = [], []
            for _ in range(args.rounds):  # interleaved: machine noise hits both alike
                one.append(samples_per_s(recipe, 1, Path(tmp) / "one"))
                two.append(samples_per_s(recipe, 2, Path(tmp) / "two"))
            a, b = statistics.median(one), statistics.median(two)
            rows.append([name, f"{a:,.0f}", f"{b:,.0f}", f"{b / a:.2f}x"])
            print(f"{name}: 1 process {one}, 2 processes {two}", flush=True)
    print(markdown_table(["model", "1 process samples/s", "2 processes samples/s", "ratio"], rows))
    print(machine_line())
    print("load:", os.getloadavg())


if __name__ == "__main__":
    main()
