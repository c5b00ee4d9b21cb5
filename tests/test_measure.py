import os

import pytest
import torch
import torch.nn as nn

from compress.checkpoint import save_model
from compress.data import create_data
from compress.errors import RecipeErrors
from compress.measure import (BenchmarkConfig, Subject, Timer, benchmark, bits_per_weight, count_macs, count_params,
                              evaluate_onnx, file_size, measure, onnx_params, saved_size, time_interleaved, to_onnx,
                              zipped_size)
from compress.models import create_model
from compress.recipe import parse_recipe
from compress.trainer import evaluate

FAST = BenchmarkConfig(runs=5, warmup=1, min_sample_ms=0, batch_sizes=[1, 4], progress=False)


@pytest.fixture(scope="module")
def data():
    return create_data({"name": "synthetic", "num_samples": 64, "num_classes": 3, "shape": [1, 4, 4]})


def test_params_nonzeros_and_sizes_on_a_known_model(tmp_path):
    m = nn.Sequential(nn.Linear(10, 5), nn.Linear(5, 2))  # 55 + 12 parameters
    with torch.no_grad():
        m[0].weight[:, :4] = 0  # 20 zeros
    assert count_params(m) == (67, 47)
    f = tmp_path / "w.pt"
    torch.save(m.state_dict(), f)
    assert file_size(f) == os.path.getsize(f)
    assert saved_size(m) > 67 * 4  # float32 weights plus the checkpoint's metadata
    assert bits_per_weight(1000, 250) == 32.0
    assert bits_per_weight(10, 0) is None


def test_zipped_size_sees_redundancy(tmp_path):
    zeros, noise = tmp_path / "zeros.bin", tmp_path / "noise.bin"
    zeros.write_bytes(bytes(100_000))
    noise.write_bytes(os.urandom(100_000))
    assert zipped_size(zeros) < 1_000
    assert 100_000 <= zipped_size(noise) < 101_000  # incompressible: raw plus the zip headers


def test_macs_of_a_known_conv_linear_stack():
    # conv 1->4, 3x3 on 8x8: 4*9*6*6 = 1296 MACs; ReLU: 144 elementwise ops; linear 144->10: 1440 MACs
    # plus 10 bias adds (torch-pruning's convention counts elementwise ops and bias too).
    m = nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(144, 10))
    assert count_macs(m, torch.zeros(3, 1, 8, 8)) == (1296 + 144 + 1440 + 10, 36 + 1450)  # (MACs, parameters)
    assert m.training  # mode restored


def test_macs_of_an_untraceable_model_warn_or_raise_when_strict():
    class Odd(nn.Module):  # a forward the counter cannot run
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            raise RuntimeError("no tracing here")

    with pytest.warns(UserWarning, match="MACs not counted: RuntimeError: no tracing here"):
        assert count_macs(Odd(), torch.zeros(1, 4)) == (None, 10)
    with pytest.raises(RuntimeError, match="no tracing here"):
        count_macs(Odd(), torch.zeros(1, 4), strict=True)


def test_onnx_params_count_initializers(tmp_path):
    m = nn.Sequential(nn.Flatten(), nn.Linear(16, 5))
    with torch.no_grad():
        m[1].weight[0] = 0
    p = to_onnx(m, torch.zeros(2, 1, 4, 4), tmp_path / "m.onnx")
    assert onnx_params(p) == (85, 85 - 16)


class FakeTimer(Timer):
    """Known per-call times, and a log of the order in which timers ran."""

    def __init__(self, name, ms, log):
        super().__init__(lambda: None)
        self.name, self.ms, self.log = name, ms, log

    def timed(self, k):
        self.log.append(self.name)
        return self.ms / 1000 * k, self.ms / 2000 * k


def test_time_interleaved_statistics_and_order():
    log = []
    res = time_interleaved({"a": FakeTimer("a", 2.0, log), "b": FakeTimer("b", 4.0, log)}, runs=6, warmup=0,
                           min_sample_ms=0, clock="wall")
    assert res["a"]["median_ms"] == pytest.approx(2.0) and res["b"]["p99_ms"] == pytest.approx(4.0)
    assert res["a"]["cpu_median_ms"] == pytest.approx(1.0)
    timed = log[6:]  # after the 3 calibration calls of each
    assert timed[:4] == ["a", "b", "b", "a"]  # alternating order so drift hits both alike
    cpu = time_interleaved({"a": FakeTimer("a", 2.0, [])}, runs=3, warmup=0, clock="cpu")
    assert cpu["a"]["median_ms"] == pytest.approx(1.0) and cpu["a"]["clock"] == "cpu"


def test_min_sample_repeats_fast_calls():
    res = time_interleaved({"a": FakeTimer("a", 0.1, [])}, runs=3, warmup=0, min_sample_ms=2.0)
    assert res["a"]["calls_per_sample"] == 20
    assert res["a"]["median_ms"] == pytest.approx(0.1)


def test_slow_models_get_fewer_runs_within_the_time_budget():
    res = time_interleaved({"a": FakeTimer("a", 100.0, []), "b": FakeTimer("b", 100.0, [])}, runs=100, warmup=2,
                           max_seconds=3.0)  # 0.2 s per interleaved run: 15 fit, less the 2 warm-up
    assert res["a"]["runs"] == 13
    assert time_interleaved({"a": FakeTimer("a", 1000.0, [])}, runs=50, warmup=0, max_seconds=1.0)["a"]["runs"] == 10


def test_measure_row_has_every_measure_and_a_ratio_to_the_baseline(data):
    model = create_model("mlp", data.input_shape, data.num_outputs, hidden=[8])
    base = create_model("mlp", data.input_shape, data.num_outputs, hidden=[64])
    row = measure(Subject(model), data, FAST, baseline=Subject(base))
    assert row["params"] == 16 * 8 + 8 + 8 * 3 + 3
    assert row["macs"] > 0 and row["zipped_bytes"] > 0 and row["bits_per_weight"] > 32
    assert [layer["name"] for layer in row["layers"]] == ["1", "3"]
    assert set(row["metrics"]) >= {"accuracy", "top5"}
    for backend in ("pytorch", "onnxruntime"):
        for bs in ("1", "4"):
            cell = row["latency"][backend][bs]
            assert cell["median_ms"] > 0 and cell["p90_ms"] >= cell["median_ms"] and cell["p99_ms"] >= cell["p90_ms"]
            assert cell["speedup"] == pytest.approx(cell["baseline_median_ms"] / cell["median_ms"], rel=1e-3)


def test_onnx_subject_is_measured_in_onnx_runtime(data, tmp_path):
    model = create_model("mlp", data.input_shape, data.num_outputs, hidden=[8])
    p = to_onnx(model, data.example_input(2), tmp_path / "m.onnx")
    assert evaluate_onnx(p, data)["accuracy"] == pytest.approx(evaluate(model, data)["accuracy"])
    cfg = FAST.model_copy(update={"backends": ["pytorch", "onnxruntime"]})
    row = measure(Subject.load(p), data, cfg)
    assert row["size_bytes"] == file_size(p) and row["params"] == count_params(model)[0]
    assert "pytorch" not in row["latency"] and row["latency"]["onnxruntime"]["1"]["speedup"] == 1.0
    assert "macs" not in row


def test_benchmark_api_on_a_checkpoint(data, tmp_path):
    model = create_model("mlp", data.input_shape, data.num_outputs, hidden=[8])
    path = save_model(model, tmp_path / "m.pt")
    m, row = benchmark(path, FAST.model_copy(update={"latency": False}), data)
    assert isinstance(m, nn.Module) and row["size_bytes"] == file_size(path) and "latency" not in row


def test_benchmark_section_errors_name_the_key(tiny_recipe):
    doc = {**tiny_recipe, "benchmark": {"runs": 0, "batch_sizes": [1, 1], "backends": ["tensorrt"]}}
    with pytest.raises(RecipeErrors) as exc:
        parse_recipe(doc)
    text = str(exc.value)
    assert "benchmark.runs: expected an integer >= 5, got 0" in text
    assert "benchmark.batch_sizes: expected distinct batch sizes, got [1, 1]" in text
    assert "benchmark.backends[0]: expected one of 'pytorch', 'onnxruntime', got 'tensorrt'" in text
