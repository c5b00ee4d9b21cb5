import pytest

from compress.errors import RecipeErrors
from compress.measure.config import BenchmarkConfig
from compress.recipe import parse_recipe


def test_defaults_time_both_cpu_backends():
    assert BenchmarkConfig().backends == ["pytorch", "onnxruntime"]


def test_benchmark_section_errors_name_the_key(tiny_recipe):
    doc = {**tiny_recipe, "benchmark": {"runs": 0, "batch_sizes": [1, 1], "backends": ["pytorch", "tensorrt"]}}
    with pytest.raises(RecipeErrors) as exc:
        parse_recipe(doc)
    text = str(exc.value)
    assert "benchmark.runs: expected an integer >= 5, got 0" in text
    assert "benchmark.batch_sizes: expected distinct batch sizes, got [1, 1]" in text
    assert "benchmark.backends[1]: expected one of 'cuda', 'onnxruntime', 'pytorch', got 'tensorrt'" in text
