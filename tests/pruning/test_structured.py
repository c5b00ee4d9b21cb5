import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from compress import PruneConfig, TrainConfig, create_data, create_model, prune, save_model
from compress.errors import RecipeError
from compress.pruning.regularizers import NormPenalty
from compress.pruning.masks import prunable_layers
from compress.measure.size import count_macs

NO_TRAIN = TrainConfig(epochs=0, progress=False)


@pytest.fixture(scope="module")
def data():
    return create_data({"name": "synthetic", "num_samples": 96, "num_classes": 4, "shape": [1, 12, 12], "batch_size": 32})


@pytest.mark.parametrize("importance", ["l1", "l2", "taylor", "bn_scale"])
def test_channel_pruning_makes_a_smaller_model_that_runs(data, importance):
    torch.manual_seed(0)
    model = create_model("small_resnet", data.input_shape, data.num_outputs, widths=[8, 16])
    for m in model.modules():  # as after training: BN scales differ (fresh ones all tie at 1)
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
    x = data.example_input(3)
    macs0, params0 = count_macs(model, x[:1])
    pruned, metrics = prune(model, PruneConfig(method="channel", sparsity=0.5, importance=importance, steps=2,
                                               round_to=1, finetune=NO_TRAIN), data)  # free widths: 8 has no half in 8s
    assert pruned(x).shape == (3, data.num_outputs)
    assert metrics["params"] < params0 * 0.5 and metrics["macs"] < macs0 * 0.5
    assert pruned.fc.out_features == data.num_outputs  # the classifier is ignored by default
    # the stem's channels are tied to the first block's residual add: pruned together
    assert pruned.stem[0].out_channels == pruned.layers[0].conv2.out_channels < 8


def test_round_to_prunes_a_layer_narrower_than_it_by_the_plain_count(data):
    """torch-pruning rounds the kept count down: 6 channels with round_to 8 asked for all 6, so the layer was
    never pruned (now a default: round_to comes from the latency backend)."""
    model = create_model("lenet5", data.input_shape, data.num_outputs)  # 6 and 16 conv channels
    pruned, _ = prune(model, PruneConfig(method="channel", sparsity=0.25, round_to=8, scope="layer", finetune=NO_TRAIN), data)
    assert pruned.features[0].out_channels == 4  # narrower than 8: the plain count (int(6 x 0.75))
    assert pruned.features[3].out_channels == 8  # 16 x 0.75 = 12 -> 8, a multiple
    assert pruned(data.example_input(2)).shape == (2, data.num_outputs)


def test_bn_scale_needs_batchnorm(data):
    model = create_model("lenet5", data.input_shape, data.num_outputs)
    with pytest.raises(RecipeError, match=r"^prune.importance: .*no BatchNorm"):
        prune(model, PruneConfig(method="channel", importance="bn_scale", finetune=NO_TRAIN), data)


def test_pruned_model_reloads_in_a_fresh_process(data, tmp_path):
    torch.manual_seed(0)
    model = create_model("lenet5", data.input_shape, data.num_outputs, width=2)
    pruned, _ = prune(model, PruneConfig(method="channel", sparsity=0.6, round_to=2, finetune=NO_TRAIN), data)
    pruned.eval()
    kept = pruned.features[0].out_channels
    assert kept < 12 and kept % 2 == 0
    x = data.example_input(4)
    save_model(pruned, tmp_path / "model.pt")
    torch.save({"x": x, "y": pruned(x).detach()}, tmp_path / "io.pt")
    code = (
        "import sys, torch\n"
        "from compress import load_model\n"
        f"m = load_model({str(tmp_path / 'model.pt')!r}).eval()\n"
        f"io = torch.load({str(tmp_path / 'io.pt')!r}, weights_only=True)\n"
        f"assert m.features[0].out_channels == {kept}, m.features[0]\n"
        "assert torch.equal(m(io['x']), io['y']), 'outputs differ'\n"
        "print('ok', sum(p.numel() for p in m.parameters()))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["ok", str(sum(p.numel() for p in pruned.parameters()))]


def test_group_lasso_penalty_and_its_effect(data):
    torch.manual_seed(0)
    lin = nn.Linear(3, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 1.0]]))
    assert NormPenalty({"l": lin}, "group_lasso").penalty().item() == pytest.approx(6.0)  # 5 + 1
    assert NormPenalty({"l": lin}, "l1").penalty().item() == pytest.approx(8.0)
    assert NormPenalty({"l": lin}, "l2").penalty().item() == pytest.approx(26.0)

    def filter_norms(strength):
        torch.manual_seed(0)
        m = create_model("lenet5", data.input_shape, data.num_outputs)
        cfg = PruneConfig(sparsity=0.0, regularize={"kind": "group_lasso", "strength": strength, "epochs": 3},
                          finetune=TrainConfig(epochs=0, progress=False, optimizer={"lr": 0.01}))
        m, _ = prune(m, cfg, data)
        return sum(w.weight.flatten(1).norm(dim=1).sum().item() for w in prunable_layers(m, ["classifier.5"]).values())

    assert filter_norms(0.05) < 0.8 * filter_norms(1e-9)
