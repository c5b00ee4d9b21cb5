"""The encode stage in a pipeline: a float model is packed and handed on read back; after int8 PTQ the ONNX
file is what gets packed, and the row measures the ONNX model read back from it."""
from pathlib import Path
from types import SimpleNamespace

import pytest

from compress import CompressError, create_data, load_model
from compress.evaluation import evaluate
from compress.pipeline import Pipeline
from compress.runtime.onnx import OrtModel
from compress.stages.encode import _onnx_input, earlier_packed_sizes, encode_onnx


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


def test_encode_after_ptq_resumes_from_a_moved_run_folder(tmp_path):
    """The PTQ row's artifact path is rewritten on resume, as its model_file is: the old folder is gone."""
    doc = _doc([{"quantize": {"method": "ptq_static", "calibration": {"batches": 2}}}, {"encode": {}}])
    Pipeline.from_dict(doc).run(out=tmp_path / "a", until=2)
    (tmp_path / "a").rename(tmp_path / "b")
    rows = Pipeline.from_dict(doc).run(out=tmp_path / "b", resume=True)["stages"]
    assert Path(rows[1]["artifact"]).is_relative_to(tmp_path / "b") and Path(rows[1]["artifact"]).is_file()
    assert Path(rows[2]["artifact"]).is_file() and isinstance(load_model(rows[2]["artifact"]), OrtModel)


def test_encode_after_ptq_without_its_onnx_file_is_a_one_line_error(tmp_path):
    doc = _doc([{"quantize": {"method": "ptq_static", "calibration": {"batches": 2}}}, {"encode": {}}])
    recipe = Pipeline.from_dict(doc).recipe
    for results in ([], [{"index": 1, "artifact": str(tmp_path / "gone" / "model_int8.onnx")}]):
        state = SimpleNamespace(recipe=recipe, stage=recipe.stages[2], results=results)
        with pytest.raises(CompressError, match="ONNX file the stage before made is missing") as exc:
            _onnx_input(state)
        assert "\n" not in str(exc.value)


def test_encode_reuses_the_size_it_packed_for_the_stage_before(tmp_path, monkeypatch):
    doc = _doc([{"encode": {}}])
    rows = Pipeline.from_dict(doc).run(out=tmp_path / "run")["stages"]
    assert rows[1]["packed_bytes_of_stages"]["0"] == rows[1]["packed_bytes"]  # the same model, packed once
    loads = []
    monkeypatch.setattr("compress.checkpoint.load_model", lambda f, **kw: loads.append(f))
    assert earlier_packed_sizes(rows[:1], last=123) == {"0": 123} and loads == []


def test_an_onnx_model_with_external_data_is_refused_and_nothing_is_written(tmp_path):
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((2, 3), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], [w])
    src = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph), str(src), save_as_external_data=True, location="m.data", size_threshold=0)
    with pytest.raises(CompressError, match="external files") as exc:
        encode_onnx(src, out=tmp_path / "out" / "m.cpk")
    assert "\n" not in str(exc.value) and not list(tmp_path.rglob("*.cpk*"))  # neither the file nor a temporary one
