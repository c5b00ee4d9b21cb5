"""Size, MACs and CPU latency of the Imagenette/Imagewoof KD recipes' teacher and students at 224 px.

The architectures alone set these numbers, so they need neither the dataset nor the pretrained
weights (the models are read from recipes/imagenette_kd.yaml and built with random weights).
Accuracy needs the data: run the recipe. Latency is each student's ratio to the teacher, measured
interleaved in one process (compress.measure), one intra-op thread, CPU-time clock.

    .venv/bin/python -m benchmarks.image_kd_models [--runs 15] [--batch 1 8]
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from benchmarks.common import ROOT, machine_line, markdown_table
from compress.data import create_data
from compress.data.imagefolder import write_shapes_folder
from compress.measure.config import BenchmarkConfig
from compress.measure.row import measure
from compress.measure.subject import Subject
from compress.models import create_model
from compress.recipe import load_recipe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "imagenette_kd.yaml"))
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        # The recipe must validate as a user runs it: a real folder for data.root, no weights download.
        folder = write_shapes_folder(Path(tmp) / "shapes", num_classes=2, train_per_class=2, val_per_class=2)
        recipe = load_recipe(args.recipe, [f"data.root={folder}", "teacher.weights=null"])
    image = recipe.data.image_size
    classes = 10  # Imagenette and Imagewoof
    data = create_data({"name": "synthetic", "num_samples": 16, "num_classes": classes, "shape": [3, image, image],
                        "eval_batch_size": 16})
    shape = (3, image, image)
    torch.manual_seed(0)
    specs = {
        f"teacher: {recipe.teacher.name}": recipe.teacher,
        f"student: {recipe.model.name} {recipe.model.widths}": recipe.model,
        f"student: {recipe.stages[2].config.model.name}": recipe.stages[2].config.model,
    }
    models = {k: create_model(s, shape, classes).eval() for k, s in specs.items()}
    cfg = BenchmarkConfig(batch_sizes=args.batch, runs=args.runs, warmup=3, threads=1, progress=False)
    names = list(models)
    teacher = Subject(models[names[0]])
    rows = {}
    for name in names:
        base = None if name == names[0] else teacher
        rows[name] = measure(Subject(models[name]), data, cfg, metrics={}, baseline=base, desc=name)
        print(f"measured {name}", flush=True)

    header = ["model", "params", "size (MiB)", "MACs (G)"]
    for backend in cfg.backends:
        for bs in cfg.batch_sizes:
            header += [f"{backend} bs{bs} (ms)", "x faster"]
    table = []
    for name, r in rows.items():
        line = [name, f"{r['params']:,}", f"{r['size_bytes'] / 2**20:.1f}", f"{(r.get('macs') or 0) / 1e9:.3f}"]
        for backend in cfg.backends:
            for bs in cfg.batch_sizes:
                lat = r["latency"].get(backend, {}).get(str(bs))
                line += [f"{lat['median_ms']:.1f}", f"{lat['speedup']:.1f}x"] if lat else ["-", "-"]
        table.append(line)
    print(f"\nImage KD recipes ({Path(args.recipe).name}): {image}x{image} RGB input, {classes} classes, "
          f"random weights; latency median of {cfg.runs} interleaved runs, 1 thread, CPU clock\n")
    print(markdown_table(header, table))
    print("\n" + machine_line())
    out = ROOT / "benchmarks" / "results" / "image_kd_models.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"recipe": args.recipe, "image_size": image, "rows": rows, "machine": machine_line()},
                              indent=2, default=str) + "\n")
    print(f"results: {out}")


if __name__ == "__main__":
    main()
