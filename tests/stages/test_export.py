import pytest
import torch
import torch.nn as nn

from compress.data import create_data
from compress.errors import CompressError, RecipeErrors
from compress.measure.size import file_size
from compress.models import create_model
from compress.pipeline import Pipeline
from compress.recipe import parse_recipe
from compress.stages.export import ExportConfig, export
from compress.trainer import evaluate


@pytest.fixture(scope="module")
def data():
    return create_data({"name": "synthetic", "num_samples": 96, "num_classes": 3, "shape": [1, 4, 4]})


class BrokenOnExport(nn.Module):
    """Computes one thing in PyTorch and another in the exported graph: a deliberately broken export."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))

    def forward(self, x):
        out = self.fc(x)
        return out + 0.5 if torch.onnx.is_in_onnx_export() else out


def test_export_writes_onnx_that_matches_pytorch(data, tmp_path):
    model = create_model("mlp", data.input_shape, data.num_outputs, hidden=[8])
    model.train()
    m, metrics = export(model, ExportConfig(opset=13), data, path=tmp_path / "m.onnx")
    assert m is model and model.training and (tmp_path / "m.onnx").is_file()
    assert metrics["max_abs_diff"] < 1e-4 and metrics["checked_samples"] > 0 and metrics["opset"] == 13
    assert metrics["accuracy"] == pytest.approx(evaluate(model, data)["accuracy"])  # measured in ONNX Runtime


def test_broken_export_fails_and_is_not_kept(data, tmp_path):
    path = tmp_path / "m.onnx"
    with pytest.raises(CompressError, match=r"export: ONNX Runtime's outputs differ from PyTorch's by up to 0\.5"):
        export(BrokenOnExport(), ExportConfig(), data, path=path)
    assert not path.exists() and (tmp_path / "m.rejected.onnx").is_file()


def test_tolerance_is_configurable(data, tmp_path):
    _, metrics = export(BrokenOnExport(), ExportConfig(atol=0.6), data, path=tmp_path / "m.onnx")
    assert metrics["max_abs_diff"] == pytest.approx(0.5, abs=1e-5)


def test_export_stage_sets_the_artifact_and_the_row_measures_it(tiny_recipe, tmp_path):
    doc = {**tiny_recipe, "stages": [{"train": {"epochs": 1, "progress": False}}, {"export": {"opset": 17}}],
           "benchmark": {"runs": 5, "warmup": 1, "min_sample_ms": 0, "batch_sizes": [2], "progress": False}}
    report = Pipeline.from_dict(doc).run(tmp_path / "run")
    row = report["stages"][1]
    onnx = tmp_path / "run" / "stages" / "01_export" / "model.onnx"
    assert row["artifact"] == str(onnx) and row["size_bytes"] == file_size(onnx)
    assert row["format"] == "onnx" and row["max_abs_diff"] < 1e-4
    assert row["metrics"]["accuracy"] == pytest.approx(report["stages"][0]["metrics"]["accuracy"])
    assert row["latency"]["onnxruntime"]["2"]["speedup"] > 0 and "pytorch" not in row["latency"]  # the .onnx ships
    assert (tmp_path / "run" / "report.html").is_file()


def test_export_options_are_validated(tiny_recipe):
    doc = {**tiny_recipe, "stages": [{"export": {"opset": 99, "format": "tflite"}}]}
    with pytest.raises(RecipeErrors) as exc:
        parse_recipe(doc)
    assert "stages[0].export.opset: expected an integer in [7, 20], got 99" in str(exc.value)
    assert "stages[0].export.format: expected one of 'onnx', got 'tflite'" in str(exc.value)
