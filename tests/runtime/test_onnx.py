import pytest
import torch

from compress.data import create_data
from compress.evaluation import evaluate
from compress.models import create_model
from compress.runtime.onnx import OrtModel, evaluate_onnx, onnx_run, onnx_session, to_onnx


@pytest.fixture(scope="module")
def data():
    return create_data({"name": "synthetic", "num_samples": 64, "num_classes": 3, "shape": [1, 4, 4]})


def test_an_exported_file_computes_what_the_model_computes(data, tmp_path):
    model = create_model("mlp", data.input_shape, data.num_outputs, hidden=[8]).eval()
    p = to_onnx(model, data.example_input(2), tmp_path / "m.onnx")
    x = data.example_input(5)  # dynamic batch
    with torch.no_grad():
        want = model(x).numpy()
    assert onnx_run(onnx_session(p), x) == pytest.approx(want, abs=1e-5)
    assert onnx_run(onnx_session(p, None, optimize=False), x) == pytest.approx(want, abs=1e-5)
    assert OrtModel(p)(x).numpy() == pytest.approx(want, abs=1e-5)
    assert evaluate_onnx(p, data)["accuracy"] == pytest.approx(evaluate(model, data)["accuracy"])


def test_unloadable_file_is_one_line(tmp_path):
    from compress.errors import CompressError

    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    with pytest.raises(CompressError, match="ONNX Runtime cannot load it"):
        onnx_session(bad)


def test_multihead_attention_exports_under_no_grad(tmp_path):
    """nn.MultiheadAttention's no-grad fast path (torchvision's ViT) has no ONNX export; to_onnx avoids it."""
    import torch.nn as nn

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x):
            return self.mha(x, x, x, need_weights=False)[0].mean(1)

    torch.manual_seed(0)
    model, x = Attn().eval(), torch.randn(3, 5, 8)
    with torch.no_grad():
        path = to_onnx(model, x, tmp_path / "m.onnx")
        assert abs(onnx_run(onnx_session(path), x) - model(x).numpy()).max() < 1e-5
    assert torch.backends.mha.get_fastpath_enabled()  # the setting comes back
