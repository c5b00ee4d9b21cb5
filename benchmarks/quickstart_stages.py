"""Does every stage of the quickstart earn its place? Seeds 0, 1, 2 of ``recipes/quickstart.yaml``, each beside the
same student trained alone with the same budget (the distill stage's epochs, optimizer, scheduler and kept
weights, no teacher).

    .venv/bin/python -m benchmarks.quickstart_stages          # about 3-4 minutes on 2 idle cores

Per seed: student alone vs distilled (val and test top-1), prune (file size and ONNX Runtime speed vs its input,
the distilled student, at batch 1 and 32), int8 (speed vs its input, the pruned student; top-1 agreement with
it). Speeds vs the input come from the run's report rows: every row is timed interleaved with the first row
(the teacher) in one process, so the ratio of two rows' speedups compares them fairly. Latencies depend on the
CPU (printed below the table). Writes ``benchmarks/results/quickstart_stages.json`` and ``.md``.
"""
from __future__ import annotations

import json
import time

from benchmarks.common import ROOT, machine_info, machine_line, markdown_table
from compress.pipeline import Pipeline
from compress.recipe import read_yaml

SEEDS = (0, 1, 2)
OUT = ROOT / "benchmarks" / "results"
TRAIN_KEYS = ("epochs", "optimizer", "scheduler", "keep", "batch_size", "augment", "label_smoothing")


def _val_accuracy(model_file: str, data) -> float:
    from compress import load_model
    from compress.evaluation import evaluate

    return evaluate(load_model(model_file), data, "val")["accuracy"]


def _speed(row: dict, bs: str) -> float:
    return row["latency"]["onnxruntime"][bs]["speedup"]


def run_seed(doc: dict, seed: int, data) -> dict:
    chain = {**doc, "seed": seed}
    distill_cfg = next(s["distill"] for s in doc["stages"] if "distill" in s)
    alone = {k: v for k, v in doc.items() if k not in ("teacher", "stages", "benchmark")}
    alone.update(seed=seed, name="quickstart-student-alone", benchmark={"latency": False},
                 stages=[{"train": {k: v for k, v in distill_cfg.items() if k in TRAIN_KEYS}}])
    t0 = time.time()
    rep = Pipeline.from_dict(chain).run(OUT / "quickstart_stages" / f"seed{seed}", force=True)
    chain_s = time.time() - t0
    solo = Pipeline.from_dict(alone).run(OUT / "quickstart_stages" / f"seed{seed}_alone", force=True)
    rows = {r["name"]: r for r in rep["stages"]}
    dist, pr, q = rows["distill"], rows["prune"], rows["quantize"]
    acc = lambda r: 100 * r["metrics"]["accuracy"]  # noqa: E731  (the report rows' test split)
    return {
        "seed": seed, "chain_seconds": round(chain_s, 1),
        "teacher_test": acc(rows["train"]),
        "alone_val": 100 * _val_accuracy(solo["stages"][0]["model_file"], data), "alone_test": acc(solo["stages"][0]),
        "distilled_val": 100 * _val_accuracy(dist["model_file"], data), "distilled_test": acc(dist),
        "pruned_val": 100 * _val_accuracy(pr["model_file"], data), "pruned_test": acc(pr),
        "prune_macs_reduction": pr.get("macs_reduction"),
        "prune_size_x": dist["size_bytes"] / pr["size_bytes"],
        **{f"prune_speed_b{bs}": _speed(pr, bs) / _speed(dist, bs) for bs in ("1", "32")},
        "int8_test": acc(q), "int8_size_x": pr["size_bytes"] / q["size_bytes"],
        **{f"int8_speed_b{bs}": _speed(q, bs) / _speed(pr, bs) for bs in ("1", "32")},
        "int8_agreement": 100 * q["int8_check"]["top1_agreement"],
    }


COLUMNS = [  # (header, key, format)
    ("alone val", "alone_val", "{:.2f}"), ("distilled val", "distilled_val", "{:.2f}"),
    ("alone test", "alone_test", "{:.2f}"), ("distilled test", "distilled_test", "{:.2f}"),
    ("pruned test", "pruned_test", "{:.2f}"), ("prune: x smaller", "prune_size_x", "{:.2f}x"),
    ("prune: x speed b1", "prune_speed_b1", "{:.2f}x"), ("prune: x speed b32", "prune_speed_b32", "{:.2f}x"),
    ("int8 test", "int8_test", "{:.2f}"), ("int8: x smaller", "int8_size_x", "{:.2f}x"),
    ("int8: x speed b1", "int8_speed_b1", "{:.2f}x"), ("int8: x speed b32", "int8_speed_b32", "{:.2f}x"),
    ("int8 agrees", "int8_agreement", "{:.1f}%"), ("chain s", "chain_seconds", "{:.0f}"),
]


def main() -> None:
    from compress import create_data

    doc = read_yaml(ROOT / "recipes" / "quickstart.yaml")
    data = create_data(doc["data"])
    results = []
    for seed in SEEDS:
        results.append(run_seed(doc, seed, data))
        print(json.dumps(results[-1]), flush=True)
    mean = {k: sum(r[k] for r in results) / len(results) for k in results[0] if k != "seed"}
    rows = [[f"seed {r['seed']}"] + [fmt.format(r[k]) for _, k, fmt in COLUMNS] for r in results]
    rows.append(["mean"] + [fmt.format(mean[k]) for _, k, fmt in COLUMNS])
    table = markdown_table(["run"] + [h for h, _, _ in COLUMNS], rows)
    note = ("top-1 % on digits (val: 144 samples, test: 360); alone = the same MLP trained with the distill stage's "
            "epochs/optimizer/scheduler and no teacher; x smaller / x speed = against the stage's input (ONNX Runtime, "
            "1 thread, median of the report's interleaved timings); int8 agrees = top-1 agreement with its fp32 input "
            "on the val samples.")
    print(table)
    print(note)
    print(machine_line())
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "quickstart_stages.json").write_text(json.dumps(
        {"recipe": "recipes/quickstart.yaml", "seeds": results, "mean": mean, "machine": machine_info()}, indent=1))
    (OUT / "quickstart_stages.md").write_text(
        "`.venv/bin/python -m benchmarks.quickstart_stages`\n\n" + table + "\n\n" + note + "\n\n" + machine_line() + "\n")


if __name__ == "__main__":
    main()
