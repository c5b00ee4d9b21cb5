"""Fake quantization: round trips within a step, straight-through gradients only inside the clip range."""
import pytest
import torch

from compress.quant.binary import SignSTE, binarize_weight, binary_activation
from compress.quant.fake_quant import ActQuant, WeightQuant, dequantize, lsq, quantize, qrange, weight_scale


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_per_channel_round_trip_within_half_a_step(bits):
    w = torch.randn(6, 3, 3, 3, generator=torch.Generator().manual_seed(bits))
    scale = weight_scale(w, bits)
    qmin, qmax = qrange(bits, signed=True)
    q = quantize(w, scale, 0, qmin, qmax, axis=0)
    assert int(q.min()) >= qmin and int(q.max()) <= qmax
    err = (dequantize(q, scale, 0, axis=0) - w).abs()
    assert (err <= scale.view(-1, 1, 1, 1) / 2 + 1e-6).all()


def test_per_tensor_asymmetric_round_trip_and_exact_zero():
    x = torch.linspace(-1.3, 5.0, 1000)
    aq = ActQuant(8).train()
    y = aq(x)
    step = float(aq.scale)
    assert (y - x).abs().max() <= step / 2 + 1e-6
    assert aq(torch.zeros(3)).abs().max() == 0  # zero is exactly representable (padding, ReLU)


def test_ema_range_moves_slowly_towards_new_batches():
    aq = ActQuant(8, momentum=0.1).train()
    aq(torch.tensor([0.0, 1.0]))
    aq(torch.tensor([0.0, 11.0]))
    assert float(aq.max_val) == pytest.approx(2.0)


def test_activation_ste_passes_gradients_only_inside_the_clip_range():
    aq = ActQuant(8).train()
    aq(torch.tensor([-1.0, 1.0]))  # range [-1, 1]
    aq.eval()
    x = torch.tensor([-3.0, -0.5, 0.0, 0.7, 2.5], requires_grad=True)
    aq(x).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


def test_lsq_gradient_reaches_input_inside_range_and_the_step_size():
    x = torch.tensor([-10.0, 0.3, 1.2, 40.0], requires_grad=True)
    s = torch.tensor(0.1, requires_grad=True)
    lsq(x, s, torch.tensor(0.0), -8, 7, grad_factor=1.0).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 0.0, 0.0]  # 1.2 / 0.1 = 12 > 7 is clipped too
    assert s.grad is not None and float(s.grad) != 0


def test_weight_quant_ste_and_learned_scale():
    w = torch.randn(4, 8, requires_grad=True)
    WeightQuant(w, 4)(w).sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))  # max-abs scale: every weight is inside the range
    wq = WeightQuant(w, 2, learned=True).train()
    out = wq(w)
    assert out.unique().numel() <= 4 * 4  # at most 4 levels per channel
    out.sum().backward()
    assert wq.scale.grad is not None


def test_sign_ste_is_hardtanh_straight_through():
    x = torch.tensor([-2.0, -1.0, -0.2, 0.0, 0.4, 1.5], requires_grad=True)
    y = SignSTE.apply(x)
    assert y.tolist() == [-1, -1, -1, 1, 1, 1]
    y.sum().backward()
    assert x.grad.tolist() == [0, 1, 1, 1, 1, 0]


def test_xnor_weights_use_per_channel_mean_abs_and_activations_threshold_above_zero():
    w = torch.tensor([[0.5, -1.5], [0.1, 0.3]])
    assert torch.allclose(binarize_weight(w, "channel"), torch.tensor([[1.0, -1.0], [0.2, 0.2]]))
    assert binary_activation(torch.tensor([0.0, 0.3, -0.2])).tolist() == [-1, 1, -1]
