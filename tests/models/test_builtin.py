"""Registry models: shapes, the import escape hatch, and self-describing checkpoints."""
import subprocess
import sys

import pytest
import torch

from compress.checkpoint import load_model, load_weights_into, save_model
from compress.errors import CompressError
from compress.models import MODELS, create_model


@pytest.mark.parametrize("name,kwargs,shape", [
    ("mlp", {"hidden": [32, 16]}, (1, 28, 28)),
    ("lenet5", {}, (1, 28, 28)),
    ("lenet5", {"width": 4}, (1, 28, 28)),
    ("lenet5", {}, (3, 64, 64)),
    ("lenet5", {}, (1, 8, 8)),
    ("smallcnn", {"widths": [8, 16]}, (3, 32, 32)),
    ("resnet18", {}, (3, 32, 32)),
])
def test_models_fit_their_inputs(name, kwargs, shape):
    model = create_model(name, shape, 7, **kwargs).eval()
    assert model(torch.zeros(2, *shape)).shape == (2, 7)


def test_lenet5_has_the_classic_size():
    # LeNet-5 on 32x32 grey input: 61,706 parameters with 10 outputs.
    model = create_model("lenet5", (1, 32, 32), 10)
    assert sum(p.numel() for p in model.parameters()) == 61706


def test_import_factory():
    model = create_model({"import": "torch.nn:Linear", "kwargs": {"in_features": 4, "out_features": 2}})
    assert isinstance(model, torch.nn.Linear)


def test_registry_names_and_descriptions():
    assert {"mlp", "lenet5", "smallcnn"} <= set(MODELS.names())
    assert all(e.description for e in MODELS)


def test_checkpoint_round_trip_in_a_fresh_process(tmp_path):
    model = create_model("smallcnn", (1, 8, 8), 3, widths=[4, 8]).eval()
    path = save_model(model, tmp_path / "m.pt")
    x = torch.randn(2, 1, 8, 8)
    torch.save(x, tmp_path / "x.pt")
    expected = model(x)
    code = (f"import torch; from compress.checkpoint import load_model; m = load_model(r'{path}').eval(); "
            f"x = torch.load(r'{tmp_path / 'x.pt'}', weights_only=True); torch.save(m(x), r'{tmp_path / 'y.pt'}')")
    subprocess.run([sys.executable, "-c", code], check=True)
    assert torch.allclose(torch.load(tmp_path / "y.pt", weights_only=True), expected)


def test_plain_state_dict_loads_through_spec(tmp_path):
    model = create_model("mlp", (4,), 2, hidden=[3])
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    other = create_model({"name": "mlp", "hidden": [3], "checkpoint": str(tmp_path / "sd.pt")}, (4,), 2)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    wrong = create_model("mlp", (4,), 2, hidden=[5])
    with pytest.raises(CompressError, match="weights do not fit the model"):
        load_weights_into(wrong, tmp_path / "sd.pt")
    with pytest.raises(CompressError, match="not a compress checkpoint"):
        load_model(tmp_path / "sd.pt")


def test_checkpoints_refuse_pickled_code(tmp_path):
    torch.save({"x": torch.nn.Linear(2, 2)}, tmp_path / "evil.pt")  # a module object needs unpickling code
    with pytest.raises(CompressError, match="not a loadable checkpoint"):
        load_model(tmp_path / "evil.pt")
