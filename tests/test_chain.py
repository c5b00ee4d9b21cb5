"""Whole chains: teacher -> distill -> prune -> quantize -> export, reloads in a fresh process, bad orders."""
import json
import subprocess
import sys

import pytest
import yaml
from click.testing import CliRunner

from compress.cli import cli
from compress.pipeline import Pipeline

DATA = {"name": "synthetic", "num_samples": 384, "num_classes": 4, "shape": [1, 8, 8], "batch_size": 32}
FAST = {"epochs": 3, "progress": False, "optimizer": {"lr": 0.005}}


def chain(last: list[dict]) -> dict:
    return {
        "name": "chain", "seed": 0, "data": DATA,
        "teacher": {"name": "mlp", "hidden": [256, 256]},
        "model": {"name": "lenet5", "width": 1},
        "stages": [
            {"train": {"target": "teacher", **FAST}},
            {"distill": {"teacher": "recipe", "temperature": 4, "alpha": 0.5, **FAST}},
            {"prune": {"method": "channel", "sparsity": 0.3, "steps": 2, "importance": "l2",
                       "finetune": {"epochs": 1, "progress": False}, "kd": {"teacher": "recipe"}}},
            *last,
        ],
        "benchmark": {"latency": False},
    }


RELOAD = """
import json, sys
from compress import BenchmarkConfig, benchmark, create_data
row = benchmark(sys.argv[1], BenchmarkConfig(latency=False, macs=False), create_data(json.loads(sys.argv[2]))).metrics
print(json.dumps(row["metrics"]))
"""


@pytest.mark.parametrize("last", [
    [{"export": {"format": "onnx"}}, {"quantize": {"method": "ptq_static", "calibration": {"batches": 2}}}],
    [{"quantize": {"method": "qat", "bits": 8, "finetune": {"epochs": 1, "progress": False}}}, {"export": {}}],
], ids=["ptq", "qat"])
def test_chain_end_to_end_and_every_stage_reloads(tmp_path, last):
    report = Pipeline.from_dict(chain(last)).run(tmp_path / "run")
    rows = report["stages"]
    assert [r["name"] for r in rows] == ["train", "distill", "prune"] + [next(iter(s)) for s in last]
    teacher, student = rows[0], rows[1]
    assert student["params"] < teacher["params"] and rows[2]["params"] < student["params"]  # channels removed
    assert all(r["metrics"]["accuracy"] > 0.5 for r in rows)  # 4 classes: chance is 0.25
    assert rows[-1]["artifact"].endswith(".onnx") and rows[-1]["size_bytes"] < teacher["size_bytes"] / 2
    # Each stage's output, reloaded by a fresh process, gives the metrics in the report.
    for r in rows:
        out = subprocess.run([sys.executable, "-c", RELOAD, r["artifact"], json.dumps(DATA)],
                             check=True, capture_output=True, text=True).stdout
        again = json.loads(out.strip().splitlines()[-1])
        assert again["accuracy"] == pytest.approx(r["metrics"]["accuracy"]), r["name"]


@pytest.mark.parametrize("stages,path,words", [
    ([{"quantize": {"method": "ptq_static"}}, {"prune": {}}], "stages[1].prune", "ONNX deployment file made by stages[0].quantize"),
    ([{"quantize": {"method": "ptq_dynamic"}}, {"export": {}}], "stages[1].export", "ONNX deployment file"),
    ([{"quantize": {"method": "binary"}}, {"train": {}}], "stages[1].train", "packed low-bit PyTorch model"),
    ([{"quantize": {"method": "qat", "bits": 4}}, {"prune": {}}], "stages[1].prune", "QAT (fake-quantized)"),
    ([{"quantize": {"method": "weight_only", "bits": 4}}, {"quantize": {}}], "stages[1].quantize", "packed"),
])
def test_invalid_stage_orders_are_refused_before_training(tmp_path, stages, path, words):
    doc = {"name": "bad", "data": DATA, "model": {"name": "mlp", "hidden": [8]}, "stages": stages}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(doc))
    result = CliRunner().invoke(cli, ["validate", str(tmp_path / "r.yaml")])
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {path}: needs") and words in result.stderr
