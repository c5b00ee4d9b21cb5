import math

import pytest
import torch
import torch.nn as nn
from torch.utils.data import TensorDataset

from compress.checkpoint import load_model, save_model
from compress.data import DataBundle
from compress.errors import CompressError
from compress.measure.size import count_params
from compress.metrics import masked_mse
from compress.models import create_model
from compress.models.kernelnet import (KernelLinear, KernelNetAutoencoder, KernelRegularizer, bake_kernels,
                                       kernel_matrix)
from compress.trainer import TrainConfig, Trainer, evaluate


def test_finite_kernel_is_one_at_zero_and_zero_beyond_unit_distance():
    u = torch.tensor([[0.0, 0.0], [0.5, 0.0], [1.0, 0.0], [0.0, 2.0]])
    v = torch.zeros(1, 2)
    k = kernel_matrix(u, v, "finite")
    assert k.shape == (1, 4)
    torch.testing.assert_close(k[0], torch.tensor([1.0, 0.75, 0.0, 0.0]))
    g = kernel_matrix(u, v, "gaussian")
    torch.testing.assert_close(g[0], torch.exp(-torch.tensor([0.0, 0.25, 1.0, 4.0])))


def test_layer_uses_w_times_kernel_and_gradients_reach_w_u_v():
    torch.manual_seed(0)
    layer = KernelLinear(6, 4, dim=3)
    with torch.no_grad():  # spread locations: some pairs connected, some cut, none at distance 0
        layer.u.normal_(0, 0.4)
        layer.v.normal_(0, 0.4)
    x = torch.randn(5, 6)
    k = kernel_matrix(layer.u, layer.v)
    assert 0 < int((k == 0).sum()) < k.numel()
    torch.testing.assert_close(layer(x), x @ (layer.weight * k).T + layer.bias)
    layer(x).pow(2).sum().backward()
    for name in ("weight", "u", "v", "bias"):
        g = getattr(layer, name).grad
        assert g is not None and g.abs().sum() > 0, name
    # a cut connection gets no gradient on its weight
    assert (layer.weight.grad[k == 0] == 0).all()


def test_masked_loss_ignores_missing_ratings():
    target = torch.tensor([[4.0, float("nan"), 2.0], [float("nan"), 5.0, float("nan")]])
    pred = torch.tensor([[3.0, 0.0, 2.0], [1.0, 4.0, -9.0]], requires_grad=True)
    loss = masked_mse(pred, target)
    torch.testing.assert_close(loss, torch.tensor((1.0 + 0.0 + 1.0) / 3))
    loss.backward()
    assert pred.grad[0, 1] == 0 and pred.grad[1, 0] == 0 and pred.grad[1, 2] == 0
    other = pred.detach().clone()
    other[torch.isnan(target)] = 123.0
    torch.testing.assert_close(masked_mse(other, target), loss.detach())


def test_predictions_clipped_at_eval_only():
    model = KernelNetAutoencoder(8, 8, hidden=[4], kernel="none")
    with torch.no_grad():
        model[-2].bias.fill_(9.0)
    x = torch.zeros(2, 8)
    assert model.train()(x).max() > 5
    out = model.eval()(x)
    assert out.max() <= 5 and out.min() >= 1


def _low_rank_ratings(items=60, users=40, rank=2, seed=0):
    """A rank-2 rating matrix in [1, 5]: 60% of entries observed for training, 15% held out for test."""
    g = torch.Generator().manual_seed(seed)
    full = torch.rand(items, rank, generator=g) @ torch.rand(rank, users, generator=g)
    full = 1 + 4 * (full - full.min()) / (full.max() - full.min())
    r = torch.rand(items, users, generator=g)
    train = torch.where(r < 0.6, full, torch.nan)
    test = torch.where(r > 0.85, full, torch.nan)
    x = torch.nan_to_num(train)
    return DataBundle(TensorDataset(x, train), None, TensorDataset(x, test), task="regression",
                      num_outputs=users, input_shape=(users,), batch_size=items)


@pytest.mark.parametrize("optimizer", ["lbfgs", "adam"])
def test_autoencoder_learns_a_low_rank_matrix(optimizer):
    torch.manual_seed(0)
    data = _low_rank_ratings()
    mean_only = (data.test.tensors[1] - data.train.tensors[1].nanmean()).pow(2).nanmean().sqrt()
    model = create_model({"name": "kernelnet_autoencoder", "hidden": [32], "lambda_2": 0.5, "lambda_s": 0.001},
                         data.input_shape, data.num_outputs)
    if optimizer == "lbfgs":  # full batch, one epoch = one L-BFGS step of max_iter iterations
        cfg = TrainConfig(epochs=2, progress=False, keep="last", optimizer={"name": "lbfgs", "lr": 1, "max_iter": 25})
    else:
        cfg = TrainConfig(epochs=150, progress=False, keep="last", optimizer={"name": "adam", "lr": 0.02})
    trainer = Trainer(model, cfg, data)  # the kernel penalty comes from model.training_hooks()
    assert sum(isinstance(h, KernelRegularizer) for h in trainer.hooks) == 1
    trainer.fit()
    rmse = evaluate(model, data, "test")["rmse"]
    # predicting the training mean scores 0.68 here; the autoencoder must recover the structure (< 0.3)
    assert mean_only > 0.6 and rmse < 0.3, (float(mean_only), rmse)


@pytest.mark.parametrize("explicit", [False, True])
def test_regularizer_comes_from_the_model_scales_by_observed_ratings_and_counts_once(explicit):
    data = _low_rank_ratings()
    n_obs = int((~torch.isnan(data.train.tensors[1])).sum())
    model = KernelNetAutoencoder(40, 40, hidden=[8], lambda_2=3.0, lambda_s=0.5)
    # the trainer adds model.training_hooks(); a regularizer also passed explicitly must not count twice
    trainer = Trainer(model, TrainConfig(epochs=0, progress=False), data, [KernelRegularizer()] if explicit else [])
    assert sum(isinstance(h, KernelRegularizer) for h in trainer.hooks) == (2 if explicit else 1)
    for h in trainer.hooks:
        h.on_fit_start(trainer)
    total = torch.tensor(1.0)
    for h in trainer.hooks:
        total = h.loss(trainer, None, None, total)
    expected = 1.0 + model.regularization() / n_obs
    torch.testing.assert_close(total, expected)
    weights = sum(m.weight.pow(2).sum() for m in model.modules() if isinstance(m, KernelLinear))
    kernels = sum(m.kernel().pow(2).sum() for m in model.modules() if isinstance(m, KernelLinear))
    torch.testing.assert_close(model.regularization(), 3.0 * weights + 0.5 * kernels)


def _spread(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, KernelLinear):
                m.u.normal_(0, 0.5)
                m.v.normal_(0, 0.5)
    return model


def test_checkpoint_and_baked_model_reload_with_same_predictions(tmp_path):
    model = _spread(create_model({"name": "kernelnet_autoencoder", "hidden": [16, 16]}, (30,), 30)).eval()
    x = torch.rand(5, 30) * 5
    want = model(x)
    torch.testing.assert_close(load_model(save_model(model, tmp_path / "k.pt")).eval()(x), want)
    sparsity = model.kernel_sparsity()
    assert 0.1 < sparsity < 0.9
    params, _ = count_params(model)
    bake_kernels(model)
    assert not any(isinstance(m, KernelLinear) for m in model.modules())
    torch.testing.assert_close(model(x), want)
    baked_params, nonzero = count_params(model)
    assert baked_params < params  # locations are gone
    assert nonzero <= baked_params - round(sparsity * 0.99 * sum(
        m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear)))
    reloaded = load_model(save_model(model, tmp_path / "baked.pt")).eval()
    assert isinstance(reloaded[0], nn.Linear)
    torch.testing.assert_close(reloaded(x), want)


def test_registry_names_and_spec_errors():
    dense = create_model("autoencoder", (20,), 20, hidden=[8])
    assert not any(isinstance(m, KernelLinear) for m in dense.modules())
    kn = create_model("kernelnet_autoencoder", (20,), 20, hidden=[8, 8], kernel="gaussian")
    assert sum(isinstance(m, KernelLinear) for m in kn.modules()) == 3 and kn.kernel_sparsity() == 0.0
    assert isinstance(kn[1], nn.Sigmoid) and len(kn) == 6  # 3 layers, 2 activations, clip
    # the paper's teacher shape: 943 users -> 500 -> 500 -> 943
    teacher = create_model("kernelnet_autoencoder", (943,), 943)
    assert math.isclose(count_params(teacher)[0], 943 * 500 * 2 + 500 * 500 + 500 + 500 + 943 + 5 * (943 * 2 + 500 * 4))
    with pytest.raises(CompressError, match=r"model.clip"):
        create_model({"name": "kernelnet_autoencoder", "clip": [5, 1]}, (4,), 4)
