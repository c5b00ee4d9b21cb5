"""Trainer overhead: samples/second of compress's Trainer vs a bare hand-written PyTorch loop.

Same model, data, optimizer and batch size; the two run interleaved (one epoch each, alternating) so
machine noise hits both alike; the median over rounds is compared. Bar: ratio >= 0.95.

    .venv/bin/python -m benchmarks.trainer_throughput [--rounds 7]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import machine_line, markdown_table
from compress.data import create_data
from compress.models import create_model
from compress.trainer import TrainConfig, Trainer


def bare_epoch(model, loader, opt) -> float:
    model.train()
    t0, n = time.perf_counter(), 0
    for x, y in loader:
        out = model(x)
        loss = F.cross_entropy(out, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        n += x.shape[0]
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--model", default="mlp", choices=["mlp", "lenet5"])
    ap.add_argument("--threads", type=int, default=1, help="torch threads for both loops (1: steady on a shared machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = create_data({"name": "synthetic", "num_samples": 8000, "num_classes": 10, "shape": [1, 28, 28],
                        "batch_size": 128, "val_fraction": 0.0, "test_fraction": 0.1})
    kwargs = {"hidden": [512, 512]} if args.model == "mlp" else {"width": 2}
    torch.manual_seed(0)
    m_trainer = create_model(args.model, data.input_shape, data.num_outputs, **kwargs)
    m_bare = create_model(args.model, data.input_shape, data.num_outputs, **kwargs)
    m_bare.load_state_dict(m_trainer.state_dict())
    cfg = TrainConfig(epochs=1, progress=False, keep="last", optimizer={"name": "sgd", "lr": 0.01})
    opt = torch.optim.SGD(m_bare.parameters(), lr=0.01, momentum=0.9)
    loader = data.loader("train", shuffle=True, generator=torch.Generator().manual_seed(0))
    bare_epoch(m_bare, loader, opt)  # warm-up both
    Trainer(m_trainer, cfg, data).fit()
    ours, bare = [], []
    for r in range(args.rounds):
        t = Trainer(m_trainer, cfg, data, seed=r)
        t.fit()
        ours.append(t.history[-1]["samples_per_s"])
        bare.append(bare_epoch(m_bare, loader, opt))
    ratio = statistics.median(o / b for o, b in zip(ours, bare))
    rows = [[args.model, f"{statistics.median(bare):,.0f}", f"{statistics.median(ours):,.0f}", f"{ratio:.3f}",
             "yes" if ratio >= 0.95 else "no"]]
    print(markdown_table(["model", "bare loop samples/s", "Trainer samples/s", "ratio (median of rounds)", ">= 0.95"], rows))
    print(machine_line())
    out = Path("benchmarks/results/trainer_throughput.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "ours": ours, "bare": bare, "ratio": ratio}, indent=2))


if __name__ == "__main__":
    main()
