"""compress.pruning.Pruner: the prune stage's schedule, one step at a time, inside your own loop."""
import pytest
import torch
import torch.nn.functional as F

from compress import PruneConfig, create_data, create_model
from compress.checkpoint import load_model, save_model
from compress.pruning import Pruner, schedules


@pytest.fixture(scope="module")
def data():
    return create_data({"name": "synthetic", "num_samples": 64, "num_classes": 3, "shape": [1, 8, 8], "batch_size": 16})


def _train_steps(model, opt, pruner, data, n=2):
    for i, (x, y) in enumerate(data.loader("train", shuffle=False)):
        if i >= n:
            break
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        pruner.after_optimizer_step()


def test_magnitude_steps_follow_the_schedule_and_zeros_stay(data):
    torch.manual_seed(0)
    model = create_model("mlp", data.input_shape, data.num_outputs, hidden=[32, 32])
    cfg = PruneConfig(method="magnitude", sparsity=0.8, steps=3, schedule="agp")
    pruner = Pruner(model, cfg, data.example_input(1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    want = schedules.agp(0.8, 3)
    for t in range(3):
        assert not pruner.done
        row = pruner.step(opt)
        assert row["target"] == pytest.approx(want[t], abs=1e-4)
        assert row["weight_sparsity"] == pytest.approx(want[t], abs=0.01)
        _train_steps(model, opt, pruner, data)
        assert pruner.summary()["weight_sparsity"] == pytest.approx(want[t], abs=0.01)  # Adam did not regrow zeros
    assert pruner.done
    with pytest.raises(RuntimeError, match="done"):
        pruner.step()
    s = pruner.summary()
    assert s["steps_done"] == 3 and s["nonzero"] < s["unpruned_params"] * 0.4


def test_channel_steps_shrink_the_model_and_the_optimizer_follows(data, tmp_path):
    torch.manual_seed(0)
    model = create_model("mlp", data.input_shape, data.num_outputs, hidden=[32, 32])
    cfg = PruneConfig(method="channel", sparsity=0.5, steps=2, schedule="linear", round_to=1)
    pruner = Pruner(model, cfg, data.example_input(1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    _train_steps(model, opt, pruner, data)
    widths = []
    for _ in range(2):
        row = pruner.step(opt)
        assert row["optimizer_params_replaced"] > 0
        ids = {id(p) for g in opt.param_groups for p in g["params"]}
        assert ids == {id(p) for p in model.parameters()}  # the optimizer trains the pruned tensors
        _train_steps(model, opt, pruner, data)  # Adam's state fits the new shapes
        widths.append([m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear)][:2])
    assert widths == [[24, 24], [16, 16]]  # linear schedule: 25 %, then 50 % of 32; the classifier is kept
    s = pruner.summary()
    assert s["channel_ratio"] == 0.5 and s["macs"] < s["unpruned_macs"]
    save_model(model, tmp_path / "m.pt")  # the last step recorded the shapes: the checkpoint reloads
    x = data.example_input(4)
    model.eval()
    assert torch.allclose(load_model(tmp_path / "m.pt")(x), model(x))


def test_channel_needs_an_example():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    with pytest.raises(ValueError, match="example_inputs"):
        Pruner(model, PruneConfig(method="channel"))
