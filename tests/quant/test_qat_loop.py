"""compress.quant.qat.prepare/convert: the quantize stage's QAT around your own loop, the same file."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from compress import QuantizeConfig, create_data, create_model, quantize
from compress.errors import RecipeError
from compress.quant import qat
from compress.quant.qat import QuantLayer
from compress.runtime.onnx import onnx_run, onnx_session


@pytest.fixture(scope="module")
def data():
    return create_data({"name": "synthetic", "num_samples": 80, "num_classes": 3, "shape": [1, 8, 8], "batch_size": 80})


def test_convert_makes_the_stage_file_on_the_same_weights(data, tmp_path):
    torch.manual_seed(0)
    model = create_model({"name": "smallcnn", "widths": [4, 8]}, data.input_shape, data.num_outputs).eval()
    twin = copy.deepcopy(model)
    # one calibration batch holding the whole training split: the stage's shuffled loader sees the same samples
    cfg = QuantizeConfig(method="qat", bits=8, calibration_batches=1, finetune={"epochs": 0, "batch_size": 80})
    staged, _ = quantize(model, cfg, data, out_dir=tmp_path / "stage")
    prepared = qat.prepare(twin, cfg, calibration=data.loader("train", shuffle=False, batch_size=80))
    assert any(isinstance(m, QuantLayer) for m in prepared.modules())
    mine = qat.convert(prepared, data.example_input(1), tmp_path / "loop.onnx", data=data)
    x = data.example_input(16)
    with torch.no_grad():
        assert torch.equal(mine(x), staged(x))
    a = onnx_run(onnx_session(tmp_path / "stage" / "model_qat_int8.onnx"), x)
    b = onnx_run(onnx_session(tmp_path / "loop.onnx"), x)
    np.testing.assert_array_equal(a, b)
    facts = qat.facts(mine)
    assert facts["quantized_layers"] > 0 and facts["int8_check"]["top1_agreement"] >= 0.9
    assert facts.keys() >= {"weight_bytes", "weight_compression", "onnx"}


def test_prepared_model_trains_in_a_plain_loop(data):
    torch.manual_seed(0)
    model = qat.prepare(create_model("mlp", data.input_shape, data.num_outputs, hidden=[16]),
                        QuantizeConfig(method="qat", bits=4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = next(iter(data.loader("train")))
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    qat.convert(model)
    assert all(m.packed for m in model.modules() if isinstance(m, QuantLayer))


def test_other_methods_and_unprepared_models_are_refused():
    model = torch.nn.Sequential(torch.nn.Linear(4, 2))
    with pytest.raises(RecipeError, match=r"quantize.method: prepare/convert are QAT's"):
        qat.prepare(model, QuantizeConfig(method="ptq_static"))
    with pytest.raises(RuntimeError, match="not prepared"):
        qat.convert(model)
