import pytest
import torch

from compress import create_data, create_model


@pytest.fixture(scope="module")
def data():
    return create_data({"name": "synthetic", "num_samples": 96, "num_classes": 3, "shape": [1, 4, 4], "batch_size": 16})


@pytest.fixture
def mlp():
    """``mlp(data, hidden, seed)``: a seeded MLP for ``data``."""
    def make(data, hidden, seed=0):
        torch.manual_seed(seed)
        return create_model("mlp", data.input_shape, data.num_outputs, hidden=hidden)
    return make
