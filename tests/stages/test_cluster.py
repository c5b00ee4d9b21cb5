import pytest
import torch

from compress import ClusterConfig, RecipeError, cluster, create_data, create_model
from compress.quant.cluster import distinct_nonzero


@pytest.fixture
def data():
    return create_data({"name": "synthetic", "num_samples": 96, "num_classes": 3, "shape": [1, 8, 8], "batch_size": 32})


def _pruned_lenet(data):
    torch.manual_seed(0)
    m = create_model({"name": "lenet5", "width": 1}, data.input_shape, data.num_outputs)
    with torch.no_grad():
        for p in m.parameters():
            if p.ndim > 1:
                p[p.abs() < p.abs().median()] = 0
    return m


def test_cluster_finetunes_only_the_codebooks(data):
    m = _pruned_lenet(data)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    cfg = ClusterConfig(bits=3, conv_bits=4, finetune={"epochs": 1, "progress": False, "optimizer": {"lr": 0.05}})
    m, metrics = cluster(m, cfg, data)
    after = dict(m.named_parameters())
    assert set(after) == set(before)  # plain layers again
    for n, p in after.items():
        if n.endswith("bias"):
            assert torch.equal(p, before[n])  # only centroids were trained
        else:
            assert torch.equal(p == 0, before[n] == 0)
            assert distinct_nonzero(p.detach()) <= (8 if "classifier" in n else 16)
    assert metrics["max_codebook"] <= 16 and "accuracy" in metrics


def test_cluster_without_teacher_for_kd_is_a_recipe_error(data):
    with pytest.raises(RecipeError, match=r"cluster\.kd"):
        cluster(_pruned_lenet(data), ClusterConfig(kd={}), data)
    with pytest.raises(RecipeError, match=r"exclude\[0\]"):
        cluster(_pruned_lenet(data), ClusterConfig(exclude=["nope"]), data)


def test_bits_outside_2_to_8_are_refused():
    with pytest.raises(Exception, match="bits"):
        ClusterConfig(bits=9)
