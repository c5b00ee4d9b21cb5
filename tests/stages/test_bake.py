import torch
import torch.nn as nn

from compress import BakeConfig, Pipeline, bake, load_model
from compress.models import create_model
from compress.models.kernelnet import KernelLinear


def _spread_kernelnet():
    model = create_model({"name": "kernelnet_autoencoder", "hidden": [16]}, (20,), 20)
    torch.manual_seed(1)
    with torch.no_grad():  # spread locations so that part of the kernel is exactly zero
        for m in model.modules():
            if isinstance(m, KernelLinear):
                m.u.normal_(0, 0.5)
                m.v.normal_(0, 0.5)
    return model.eval()


def test_bake_turns_kernel_zeros_into_zero_weights_and_keeps_predictions():
    model = _spread_kernelnet()
    x = torch.rand(4, 20) * 5
    want = model(x)
    share = model.kernel_sparsity()
    model, metrics = bake(model, BakeConfig())
    assert not any(isinstance(m, KernelLinear) for m in model.modules())
    assert metrics["baked_layers"] == 2 and metrics["kernel_zero_share"] == share and 0.1 < share < 0.9
    assert metrics["zero_weight_share"] >= share  # what pruning now sees as already pruned
    torch.testing.assert_close(model(x), want)


def test_bake_stage_in_a_recipe_reloads_as_linear(tmp_path):
    doc = {"name": "bake", "data": {"name": "synthetic", "task": "regression", "shape": [12], "num_samples": 32},
           "model": {"name": "kernelnet_autoencoder", "hidden": [8], "clip": None},
           "benchmark": {"latency": False, "macs": False, "progress": False},
           "stages": [{"train": {"epochs": 1, "progress": False, "optimizer": {"name": "lbfgs", "max_iter": 2}}},
                      {"bake_kernels": {}}]}
    report = Pipeline.from_dict(doc).run(tmp_path / "run")
    row = report["stages"][1]
    assert row["baked_layers"] == 2 and "kernel_zero_share" in row
    model = load_model(tmp_path / "run" / "stages" / "01_bake_kernels" / "model.pt")
    assert isinstance(model[0], nn.Linear) and not any(isinstance(m, KernelLinear) for m in model.modules())
