"""The encode stage in a pipeline: a float model is packed and handed on read back; after int8 PTQ the ONNX
file is what gets packed, and the row measures the ONNX model read back from it."""
import pytest

from compress import create_data, load_model
from compress.evaluation import evaluate
from compress.pipeline import Pipeline
from compress.runtime.onnx import OrtModel


def _doc(stages):
    return {"name": "enc", "seed": 0,
            "data": {"name": "synthetic", "num_samples": 128, "num_classes": 3, "shape": [1, 6, 6], "batch_size": 32},
            "model": {"name": "mlp", "hidden": [32]},
            "stages": [{"train": {"epochs": 1, "progress": False}}, *stages],
            "benchmark": {"latency": False, "macs": False}}


def test_encode_after_int8_ptq_packs_the_onnx_file(tmp_path):
    doc = _doc([{"quantize": {"method": "ptq_static", "calibration": {"batches": 2}}}, {"encode": {}}])
    rows = Pipeline.from_dict(doc).run(out=tmp_path / "run")["stages"]
    ptq, enc = rows[1], rows[2]
    assert enc["artifact"].endswith(".cpk") and enc["size_bytes"] == enc["packed_bytes"] < ptq["size_bytes"]
    assert enc["raw_bytes"] == ptq["size_bytes"]
    assert enc["metrics"]["accuracy"] == pytest.approx(ptq["metrics"]["accuracy"])  # the same int8 model
    back = load_model(enc["artifact"])
    assert isinstance(back, OrtModel)
    assert evaluate(back, create_data(doc["data"]), "test", "cpu")["accuracy"] == pytest.approx(ptq["metrics"]["accuracy"])


def test_encode_of_a_float_model_hands_on_the_model_read_back(tmp_path):
    rows = Pipeline.from_dict(_doc([{"encode": {}}])).run(out=tmp_path / "run")["stages"]
    assert rows[1]["artifact"].endswith(".cpk") and rows[1]["size_bytes"] < rows[0]["size_bytes"]
    assert rows[1]["metrics"]["accuracy"] == pytest.approx(rows[0]["metrics"]["accuracy"])


def test_encode_records_what_each_earlier_stage_would_take_packed(tmp_path):
    doc = _doc([{"prune": {"method": "magnitude", "sparsity": 0.8, "finetune": {"epochs": 0}}}, {"encode": {}}])
    rows = Pipeline.from_dict(doc).run(out=tmp_path / "run")["stages"]
    sizes = rows[2]["packed_bytes_of_stages"]
    assert set(sizes) == {"0", "1"} and sizes["1"] < sizes["0"] / 2  # the sparse index of the 80%-pruned model
    assert sizes["1"] == rows[2]["packed_bytes"]  # the same model as the one encode packed
