import numpy as np
import pytest
import torch
import torch.nn as nn

from compress.quant.cluster import (centroid_parameters, cluster_model, clustered_layers, distinct_nonzero,
                                    initial_centroids, kmeans_1d, strip)


def _pruned_mlp(seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(30, 40), nn.ReLU(), nn.Linear(40, 5))
    with torch.no_grad():
        for layer in (m[0], m[2]):
            layer.weight[layer.weight.abs() < layer.weight.abs().median()] = 0
    return m


@pytest.mark.parametrize("init", ["linear", "density", "kmeans++"])
@pytest.mark.parametrize("bits", [2, 3, 5])
def test_codebook_never_exceeds_2_to_bits_and_zeros_stay_out(init, bits):
    m = _pruned_mlp()
    zeros = [(l.weight == 0).clone() for l in (m[0], m[2])]
    sizes = cluster_model(m, bits, init)
    assert all(1 <= k <= 2 ** bits for k in sizes.values())
    for layer, z in zip((m[0], m[2]), zeros):
        w = layer.weight.detach()
        assert torch.equal(w == 0, z)  # pruned zeros kept, no new zeros
        assert distinct_nonzero(w) <= 2 ** bits
        assert not (layer.parametrizations.weight.original == 0).any()  # zero is not a centroid


def test_few_distinct_values_are_kept_exactly():
    values = np.array([0.5, -1.0, 0.5, 2.0, -1.0])
    centroids, codes = kmeans_1d(values, 3)
    assert centroids.tolist() == [-1.0, 0.5, 2.0] and np.array_equal(centroids[codes], values.astype(np.float32))


def test_inits_follow_the_paper():
    v = np.random.default_rng(0).normal(size=2000)
    lin = initial_centroids(v, 8, "linear")
    assert lin.min() == v.min() and lin.max() == v.max() and np.allclose(np.diff(lin), np.diff(lin)[0])
    dens = initial_centroids(v, 8, "density")  # crowds where the weights are (around 0)
    assert dens.size == 8 and np.abs(dens).max() < 0.5 * np.abs(lin).max()


def test_finetuning_moves_only_centroids_with_gradients_summed_per_cluster():
    m = _pruned_mlp()
    cluster_model(m, 3)
    layer = m[0]
    codes = layer.parametrizations.weight[0].codes.clone()
    x = torch.randn(8, 30)
    plain = nn.Sequential(nn.Linear(30, 40), nn.ReLU(), nn.Linear(40, 5))
    with torch.no_grad():
        for a, b in ((plain[0], m[0]), (plain[2], m[2])):
            a.weight.copy_(b.weight)
            a.bias.copy_(b.bias)
    plain(x).sum().backward()
    m(x).sum().backward()
    cb = layer.parametrizations.weight.original
    for c in range(cb.numel()):  # the centroid's gradient is the sum over its cluster's weights
        torch.testing.assert_close(cb.grad[c], plain[0].weight.grad[codes == c].sum())
    params = {n for n, p in m.named_parameters()}
    assert "0.weight" not in params and "0.parametrizations.weight.original" in params
    opt = torch.optim.SGD(centroid_parameters(m), lr=0.1)
    opt.step()
    assert torch.equal(layer.parametrizations.weight[0].codes, codes)
    strip(m)
    assert not clustered_layers(m) and isinstance(m[0].weight, nn.Parameter)
    got = m[0].weight.detach()
    assert torch.equal(got == 0, codes < 0) and distinct_nonzero(got) <= 8
