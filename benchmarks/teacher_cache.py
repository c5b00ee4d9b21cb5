"""Epoch time of distillation with a large teacher: live teacher vs cached teacher outputs.

    .venv/bin/python -m benchmarks.teacher_cache [--pairs 3] [--teacher-width 2048]

One-epoch runs are interleaved (live, cached, cached, live, ...) so load from other processes hits
both alike; the epoch time is the trainer's loop time, the cache build (one teacher pass over the
training set, paid once per stage) is reported separately.
"""
from __future__ import annotations

import json
import statistics
import time

import click
import torch

from benchmarks.common import ROOT, data_dir, machine_line, markdown_table
from compress.trainer import Hook


class EpochTimer(Hook):
    """Keeps each epoch's loop seconds (the trainer's own timing, validation excluded)."""

    def __init__(self):
        self.seconds = []

    def on_epoch_end(self, trainer, epoch, metrics):
        self.seconds.append(metrics["seconds"])


@click.command()
@click.option("--pairs", default=3, show_default=True, help="live/cached one-epoch runs of each")
@click.option("--teacher-width", default=2048, show_default=True, help="teacher MLP 2 x this width")
@click.option("--threads", default=1, show_default=True)
def main(pairs: int, teacher_width: int, threads: int):
    from compress import create_data, create_model
    from compress.stages.distill import DistillConfig, _fit

    torch.set_num_threads(threads)
    root = data_dir() / "mnist-t10k"
    data = create_data({"name": "mnist", "root": str(root), "test_size": 2000, "val_fraction": 0.1, "batch_size": 128})
    torch.manual_seed(0)
    teacher = create_model("mlp", data.input_shape, 10, hidden=[teacher_width, teacher_width])
    student = create_model("mlp", data.input_shape, 10, hidden=[64, 64])
    t_params = sum(p.numel() for p in teacher.parameters())
    s_params = sum(p.numel() for p in student.parameters())
    times = {"live": [], "cached": [], "other_live": [], "other_cached": []}
    # One untimed run first: the first optimizer construction imports torch._dynamo (seconds).
    _fit(student, [teacher], DistillConfig(epochs=1, cache_teacher=False, progress=False), data, path="distill", name="warm-up")
    order = [m for i in range(pairs) for m in (("live", "cached") if i % 2 == 0 else ("cached", "live"))]
    for mode in order:
        timer = EpochTimer()
        cfg = DistillConfig(epochs=1, cache_teacher=mode == "cached", progress=False, keep="last")
        t0 = time.perf_counter()
        _fit(student, [teacher], cfg, data, path="distill", hooks=[timer], name=f"distill:{mode}")
        total = time.perf_counter() - t0
        times[mode].append(timer.seconds[0])
        times[f"other_{mode}"].append(total - timer.seconds[0])  # checks, validation, and the cache build
    # The other work is the same in both modes but for the cache build.
    build = statistics.median(times["other_cached"]) - statistics.median(times["other_live"])
    live, cached = statistics.median(times["live"]), statistics.median(times["cached"])
    ratios = [a / b for a, b in zip(times["live"], times["cached"])]
    rows = [[f"MLP 2x{teacher_width} ({t_params / 1e6:.1f}M params)", f"MLP 2x64 ({s_params / 1e3:.0f}k)",
             len(data.train), f"{live:.2f}", f"{cached:.2f}", f"{live / cached:.2f}x",
             f"{min(ratios):.2f}x-{max(ratios):.2f}x", f"{build:.2f}"]]
    table = markdown_table(["teacher", "student", "train examples", "epoch s, live teacher", "epoch s, cached",
                            "speedup (median)", "speedup range", "cache build s (once per stage)"], rows)
    print(table)
    print(f"\n{pairs} interleaved one-epoch runs per mode, torch threads {threads}.")
    print(machine_line())
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "teacher_cache.json").write_text(json.dumps({"times": times, "speedup": live / cached,
                                                       "teacher_width": teacher_width, "machine": machine_line()}, indent=2))


if __name__ == "__main__":
    main()
