import numpy as np
import pytest

from compress.data import create_data
from compress.measure.config import BenchmarkConfig
from compress.measure.latency import interleaved_latency, measure_latency
from compress.measure.subject import Subject
from compress.models import create_model
from compress.runtime.backends import BACKENDS, LatencyBackend
from compress.runtime.onnx import to_onnx
from compress.runtime.timing import Timer

FAST = dict(runs=5, warmup=0, min_sample_ms=0, batch_sizes=[1, 4], progress=False)


@pytest.fixture(scope="module")
def data():
    return create_data({"name": "synthetic", "num_samples": 64, "num_classes": 3, "shape": [1, 4, 4]})


class KnownTimer(Timer):
    """ms per call proportional to the model's hidden width: known ratios, no clock."""

    def __init__(self, ms, log):
        super().__init__(lambda: None)
        self.ms, self.log = ms, log

    def timed(self, k):
        self.log.append(self.ms)
        return self.ms / 1000 * k, self.ms / 1000 * k


@pytest.fixture()
def toy(monkeypatch):
    """A toy backend registered for this test only."""
    monkeypatch.setattr(BACKENDS, "_entries", dict(BACKENDS._entries))
    log, loads = [], []

    @BACKENDS.register("toy")
    class Toy(LatencyBackend):
        """Times nothing: per-call ms = hidden width / 8."""

        def load(self, source, threads):
            loads.append((type(source).__name__, threads))
            return source

        def timer(self, loaded, x):
            return KnownTimer(loaded[1].out_features / 8, log)

    return Toy, log, loads


def test_a_registered_backend_is_timed_by_measure_latency(data, toy):
    Toy, log, loads = toy
    cfg = BenchmarkConfig(backends=["toy"], gpu=False, **FAST)  # the name validates once registered
    small = create_model("mlp", data.input_shape, data.num_outputs, hidden=[8])
    big = create_model("mlp", data.input_shape, data.num_outputs, hidden=[24])
    out = measure_latency(Subject(small), data, cfg, baseline=Subject(big))
    assert len(loads) == 2 and {t for _, t in loads} == {1}  # once per model (not per batch size), benchmark threads
    assert set(out) == {"threads", "runs", "toy"} and set(out["toy"]) == {"1", "4"}
    cell = out["toy"]["1"]
    assert cell["median_ms"] == pytest.approx(1.0) and cell["baseline_median_ms"] == pytest.approx(3.0)
    assert cell["speedup"] == pytest.approx(3.0) and cell["clock"] == "cpu"
    assert sorted(set(log)) == [1.0, 3.0]


def test_gpu_backends_join_unlisted_only_when_available_and_asked(data, toy):
    Toy, log, _ = toy
    Toy.gpu = True
    model = create_model("mlp", data.input_shape, data.num_outputs, hidden=[8])
    out = measure_latency(Subject(model), data, BenchmarkConfig(backends=["pytorch"], gpu=True, **FAST))
    assert out["toy"]["4"]["speedup"] == 1.0 and "pytorch" in out
    out = measure_latency(Subject(model), data, BenchmarkConfig(backends=["pytorch"], gpu=False, **FAST))
    assert "toy" not in out
    Toy.available = lambda self: False
    out = measure_latency(Subject(model), data, BenchmarkConfig(backends=["toy"], **FAST))
    assert "toy" not in out and out["notes"] == ["toy: not available on this machine"]


def test_unknown_backend_names_list_the_registry(toy):
    with pytest.raises(ValueError, match="expected one of 'cuda', 'onnxruntime', 'pytorch', 'toy', got 'tensorrt'"):
        BenchmarkConfig(backends=["tensorrt"])


def test_an_onnx_subject_is_timed_only_in_onnx_backends(data, tmp_path):
    model = create_model("mlp", data.input_shape, data.num_outputs, hidden=[8])
    p = to_onnx(model, data.example_input(1), tmp_path / "m.onnx")
    out = measure_latency(Subject(None, p, p), data, BenchmarkConfig(backends=["pytorch", "onnxruntime"], **FAST),
                          baseline=Subject(model))
    assert "pytorch" not in out and out["onnxruntime"]["1"]["speedup"] > 0


def test_interleaved_latency_of_onnx_files(data, tmp_path):
    model = create_model("mlp", data.input_shape, data.num_outputs, hidden=[8])
    p = to_onnx(model, data.example_input(1), tmp_path / "m.onnx")
    res = interleaved_latency({"a": p, "b": p}, data.example_input(2).numpy(), warmup=2, rounds=3, reps=2)
    assert set(res) == {"a", "b"} and all(isinstance(v, float) and v > 0 for v in res.values())
    assert np.isfinite(list(res.values())).all()
