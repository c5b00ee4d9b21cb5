import pytest

from compress.runtime.timing import Timer, stats_ms, time_interleaved


class FakeTimer(Timer):
    """Known per-call times, and a log of the order in which timers ran (and with how many calls)."""

    def __init__(self, name, ms, log):
        super().__init__(lambda: None)
        self.name, self.ms, self.log = name, ms, log

    def timed(self, k):
        self.log.append(self.name)
        return self.ms / 1000 * k, self.ms / 2000 * k


def test_timer_runs_the_call_k_times():
    calls = []
    wall, cpu = Timer(lambda: calls.append(1)).timed(7)
    assert len(calls) == 7 and wall >= 0 and cpu >= 0


def test_stats_in_ms():
    s = stats_ms([0.001, 0.002, 0.003])
    assert s["median_ms"] == pytest.approx(2.0) and s["mean_ms"] == pytest.approx(2.0)
    assert s["median_ms"] <= s["p90_ms"] <= s["p99_ms"] <= 3.0


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


def test_fixed_reps_skip_calibration():
    log = []
    res = time_interleaved({"a": FakeTimer("a", 1.0, log)}, runs=4, warmup=2, reps=3)
    assert len(log) == 2 + 4  # warm-up samples, then timed ones: no calibration calls
    assert res["a"]["calls_per_sample"] == 3 and res["a"]["runs"] == 4 and res["a"]["median_ms"] == pytest.approx(1.0)


def test_slow_models_get_fewer_runs_within_the_time_budget():
    res = time_interleaved({"a": FakeTimer("a", 100.0, []), "b": FakeTimer("b", 100.0, [])}, runs=100, warmup=2,
                           max_seconds=3.0)  # 0.2 s per interleaved run: 15 fit, less the 2 warm-up
    assert res["a"]["runs"] == 13
    assert time_interleaved({"a": FakeTimer("a", 1000.0, [])}, runs=50, warmup=0, max_seconds=1.0)["a"]["runs"] == 10
