import torch
import torch.nn as nn

from compress import TrainConfig, Trainer, create_data, create_model
from compress.pruning.masks import (MaskHook, apply_masks, magnitude_masks, prunable_layers, sparse_bytes,
                                    storage_report, weight_sparsity)
from compress.trainer import Hook


def _data():
    return create_data({"name": "synthetic", "num_samples": 128, "num_classes": 3, "shape": [1, 8, 8], "batch_size": 32})


def test_global_and_layer_scopes_hit_the_target():
    torch.manual_seed(0)
    model = create_model("mlp", (1, 8, 8), 3, hidden=[32, 32])
    layers = prunable_layers(model)
    apply_masks(layers, magnitude_masks(layers, 0.8, "layer"))
    for m in layers.values():
        assert int((m.weight == 0).sum()) == round(0.8 * m.weight.numel())  # exactly, per layer
    model = create_model("mlp", (1, 8, 8), 3, hidden=[32, 32])
    layers = prunable_layers(model)
    masks = magnitude_masks(layers, 0.7, "global")
    apply_masks(layers, masks)
    assert abs(weight_sparsity(layers) - 0.7) < 0.005
    per_layer = [(m.weight == 0).float().mean().item() for m in layers.values()]
    assert max(per_layer) - min(per_layer) > 0.01  # global ranking: layers differ


def test_masks_stay_zero_after_every_optimizer_step():
    torch.manual_seed(0)
    data = _data()
    model = create_model("mlp", data.input_shape, data.num_outputs, hidden=[32])
    layers = prunable_layers(model)
    masks = magnitude_masks(layers, 0.9, "global")

    class Check(Hook):
        steps = 0

        def after_step(self, trainer):
            for n, m in layers.items():
                assert torch.all(m.weight[~masks[n]] == 0)
            Check.steps += 1

    Trainer(model, TrainConfig(epochs=2, progress=False, optimizer={"name": "adam", "lr": 0.05}), data,
            [MaskHook(layers, masks), Check()]).fit()
    assert Check.steps == 2 * 3  # 92 training samples / 32 = 3 steps per epoch
    for n, m in layers.items():
        assert torch.all(m.weight[~masks[n]] == 0)
        assert m.weight[masks[n]].abs().min() > 0  # kept weights still train and are not zeroed by mistake


def test_sparse_storage_sizes():
    t = torch.zeros(4, 8)
    t[0, 0] = t[3, 7] = 1.0
    s = sparse_bytes(t)
    assert s == {"dense": 128, "bitmask": 4 + 2 * 4, "csr": 2 * 8 + 5 * 4}
    model = nn.Sequential(nn.Linear(100, 100, bias=False))
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].weight[0, :5] = 1
    rep = storage_report(model)
    assert rep["dense_bytes"] == 40000 and rep["sparse_bytes"] == 5 * 8 + 101 * 4  # CSR wins at 0.05% density
