import pytest
import torch
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
    assert row["macs"] > 0 and row["zipped_bytes"] > 0
    # bits/weight counts the float32 weights' own bits; the file's overhead is in the file's bits/param only
    assert row["weight_bits_per_weight"] == 32.0 and row["file_bits_per_param"] > 32
    assert [(layer["name"], layer["type"], layer["shape"]) for layer in row["layers"]] == [
        ("1", "Linear", [8, 16]), ("3", "Linear", [3, 8])]
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
    assert row["weight_bits_per_weight"] == 32.0
    assert "pytorch" not in row["latency"] and row["latency"]["onnxruntime"]["1"]["speedup"] == 1.0
    assert "macs" not in row


def test_benchmark_api_on_a_checkpoint(data, tmp_path):
    model = create_model("mlp", data.input_shape, data.num_outputs, hidden=[8])
    path = save_model(model, tmp_path / "m.pt")
    m, row = benchmark(path, FAST.model_copy(update={"latency": False}), data)
    assert isinstance(m, nn.Module) and row["size_bytes"] == file_size(path) and "latency" not in row


def test_a_row_with_model_and_onnx_file_counts_the_file_it_sizes(data, tmp_path):
    """An int8 stage keeps its float model beside the file: the row counts the file, as `compress bench` of it does."""
    model = create_model("mlp", data.input_shape, data.num_outputs, hidden=[8])
    p = to_onnx(model, data.example_input(2), tmp_path / "m.onnx")
    fast = FAST.model_copy(update={"latency": False, "macs": False})
    with torch.no_grad():
        model[1].weight.zero_()  # the model in memory differs from its file: the row must describe the file
    both, file_only = measure(Subject(model, p, p), data, fast), measure(Subject.load(p), data, fast)
    assert both["params"] == file_only["params"] == count_params(model)[0]
    assert both["nonzero_params"] == file_only["nonzero_params"] > count_params(model)[1]
