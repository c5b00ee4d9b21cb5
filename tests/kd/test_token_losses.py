"""Per-token KD for language models: chunked == unchunked, the divergences by hand."""
import math

import pytest
import torch
import torch.nn.functional as F

from compress.kd.losses import kd_loss, task_problem, token_divergence


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_chunked_equals_unchunked(kind):
    torch.manual_seed(0)
    s = torch.randn(2, 5, 37, requires_grad=True)
    t = torch.randn(2, 5, 37)
    whole = token_divergence(s, t, 2.0, kind, chunk=10_000)
    (g_whole,) = torch.autograd.grad(whole, s)
    parts = token_divergence(s, t, 2.0, kind, chunk=3)  # 10 tokens in chunks of 3, 3, 3, 1
    (g_parts,) = torch.autograd.grad(parts, s)
    assert torch.allclose(whole, parts, atol=1e-6) and torch.allclose(g_whole, g_parts, atol=1e-7)


def test_divergences_by_hand():
    s, t = torch.log(torch.tensor([[0.5, 0.5]])), torch.log(torch.tensor([[0.9, 0.1]]))
    fwd = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    rev = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    m = [0.7, 0.3]
    jsd = 0.5 * (0.9 * math.log(0.9 / 0.7) + 0.1 * math.log(0.1 / 0.3)) + 0.5 * (0.5 * math.log(0.5 / 0.7) + 0.5 * math.log(0.5 / 0.3))
    for kind, want in (("forward_kl", fwd), ("reverse_kl", rev), ("jsd", jsd)):
        assert math.isclose(token_divergence(s, t, 1.0, kind).item(), want, rel_tol=1e-5)
    # at T = 2 the softened distributions, times T^2
    soft = F.kl_div(F.log_softmax(s / 2, -1), F.softmax(t / 2, -1), reduction="batchmean").item() * 4
    assert math.isclose(kd_loss("token_kl").obj(s, t, 2.0).item(), soft, rel_tol=1e-5)


def test_token_losses_need_lm_data():
    assert "lm data" in task_problem("token_kl", "classification")
    assert task_problem("token_jsd", "lm") is None and "token_kl" in task_problem("kl", "lm")
