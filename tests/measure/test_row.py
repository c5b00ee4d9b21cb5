import pytest
import torch.nn as nn

from compress.checkpoint import save_model
from compress.data import create_data
from compress.evaluation import evaluate
from compress.measure.config import BenchmarkConfig
from compress.measure.row import benchmark, measure
from compress.measure.size import count_params, file_size
from compress.measure.subject import Subject
from compress.models import create_model
from compress.runtime.onnx import to_onnx

FAST = BenchmarkConfig(runs=5, warmup=1, min_sample_ms=0, batch_sizes=[1, 4], progress=False)


@pytest.fixture(scope="module")
def data():
    return create_data({"name": "synthetic", "num_samples": 64, "num_classes": 3, "shape": [1, 4, 4]})


def test_measure_row_has_every_measure_and_a_ratio_to_the_baseline(data):
    model = create_model("mlp", data.input_shape, data.num_outputs, hidden=[8])
    base = create_model("mlp", data.input_shape, data.num_outputs, hidden=[64])
    row = measure(Subject(model), data, FAST, baseline=Subject(base))
    assert row["params"] == 16 * 8 + 8 + 8 * 3 + 3
    assert row["macs"] > 0 and row["zipped_bytes"] > 0 and row["bits_per_weight"] > 32
    assert [layer["name"] for layer in row["layers"]] == ["1", "3"]
    assert row["metrics"] == evaluate(model, data, "test")
    for backend in ("pytorch", "onnxruntime"):
        for bs in ("1", "4"):
            cell = row["latency"][backend][bs]
            assert cell["median_ms"] > 0 and cell["p90_ms"] >= cell["median_ms"] and cell["p99_ms"] >= cell["p90_ms"]
            assert cell["speedup"] == pytest.approx(cell["baseline_median_ms"] / cell["median_ms"], rel=1e-3)


def test_given_metrics_are_not_recomputed(data):
    model = create_model("mlp", data.input_shape, data.num_outputs, hidden=[8])
    row = measure(Subject(model), data, FAST.model_copy(update={"latency": False}), metrics={"accuracy": 0.5})
    assert row["metrics"] == {"accuracy": 0.5}


def test_onnx_subject_is_measured_in_onnx_runtime(data, tmp_path):
    model = create_model("mlp", data.input_shape, data.num_outputs, hidden=[8])
    p = to_onnx(model, data.example_input(2), tmp_path / "m.onnx")
    row = measure(Subject.load(p), data, FAST)
    assert row["metrics"]["accuracy"] == pytest.approx(evaluate(model, data)["accuracy"])
    assert row["size_bytes"] == file_size(p) and row["params"] == count_params(model)[0]
    assert "pytorch" not in row["latency"] and row["latency"]["onnxruntime"]["1"]["speedup"] == 1.0
    assert "macs" not in row


def test_benchmark_api_on_a_checkpoint(data, tmp_path):
    model = create_model("mlp", data.input_shape, data.num_outputs, hidden=[8])
    path = save_model(model, tmp_path / "m.pt")
    m, row = benchmark(path, FAST.model_copy(update={"latency": False}), data)
    assert isinstance(m, nn.Module) and row["size_bytes"] == file_size(path) and "latency" not in row
