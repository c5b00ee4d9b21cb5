"""GPTQ against round-to-nearest on the same group-wise grid, and group-wise packed layers."""
import torch
import torch.nn as nn

from compress.quant.fake_quant import qrange
from compress.quant.gptq import conv1d_to_linear, gptq, quantization_error
from compress.quant.qat import QuantLayer


def _rtn(w, bits, g):
    qmin, qmax = qrange(bits, signed=True)
    groups = w.reshape(w.shape[0], -1, g)
    scale = (groups.abs().amax(-1) / qmax).clamp_min(1e-8)
    return torch.clamp(torch.round(groups / scale.unsqueeze(-1)), qmin, qmax).view_as(w).int(), scale


def test_gptq_beats_round_to_nearest_on_correlated_inputs():
    torch.manual_seed(0)
    w = torch.randn(24, 64)
    x = torch.randn(512, 8) @ torch.randn(8, 64) + 0.1 * torch.randn(512, 64)  # low-rank: columns correlate
    H = 2 * x.t() @ x / len(x)
    codes, scales = gptq(w, H, bits=4, group_size=16)
    assert codes.shape == w.shape and scales.shape == (24, 4)
    assert int(codes.min()) >= -8 and int(codes.max()) <= 7
    rtn = quantization_error(w, *_rtn(w, 4, 16), H)
    assert quantization_error(w, codes, scales, H) < 0.5 * rtn


def test_group_wise_layer_packs_and_reloads():
    torch.manual_seed(0)
    lin = nn.Linear(32, 6)
    layer = QuantLayer(lin, {"kind": "int", "bits": 4, "group_size": 8})
    before = layer.quantized_weight().detach().clone()
    codes, scale = _rtn(lin.weight.detach(), 4, 8)
    assert torch.allclose(before, (codes.view(6, 4, 8) * scale.unsqueeze(-1)).view(6, 32), atol=1e-6)
    layer.pack()
    assert layer.weight_scale.shape == (24,) and layer.weight_packed.numel() == 6 * 32 // 2
    assert torch.allclose(layer.quantized_weight(), before, atol=1e-6)


def test_conv1d_becomes_the_same_linear():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(5, 3))
    x = torch.randn(2, 3)
    want = model(x)
    assert conv1d_to_linear(model, ["0"]) == ["0"] and isinstance(model[0], nn.Linear)
    assert torch.allclose(model(x), want, atol=1e-6)
