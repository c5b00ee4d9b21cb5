"""compress.kd.Distiller: the distill stage's loss inside your own loop, hooks removed on close."""
import pytest
import torch
import torch.nn.functional as F

from compress import DistillConfig
from compress.errors import RecipeError
from compress.kd import Distiller
from compress.kd.hook import DistillHook
from compress.kd.teachers import frozen
from compress.trainer import Batch


def _stage_loss(student, teacher, cfg, x, y, adapters=None):
    """What the distill stage's trainer computes on one batch (hook built as the stage builds it)."""
    with frozen([teacher]):
        hook = DistillHook(student, [teacher], cfg, [1.0], x)
        if adapters is not None:
            hook.adapters.load_state_dict(adapters)
        student.train()
        out = student(x)
        loss = hook.loss(None, Batch(x, y), out, F.cross_entropy(out, y))
        hook.close()
    return loss


@pytest.mark.parametrize("hints", [False, True])
def test_loss_equals_the_stage_loss_on_the_same_batch(data, mlp, hints):
    teacher, student = mlp(data, [16, 16], 1), mlp(data, [8, 8], 2)
    cfg = DistillConfig(temperature=3, alpha=0.3, hints=[{"student": 1, "teacher": 1}] if hints else [])
    x, y = data.example_input(8), torch.arange(8) % 3
    with Distiller(teacher, cfg, student=student, example_inputs=x) as kd:
        assert len(list(kd.parameters())) == (2 if hints else 0)  # the hint's linear map: weight and bias
        student.train()
        got = kd.loss(student(x), x, y)
        want = _stage_loss(student, teacher, cfg, x, y, kd.state_dict()["adapters"])
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    assert not student._forward_hooks and not student._forward_pre_hooks
    assert all(not m._forward_hooks for m in teacher.modules()) and all(p.requires_grad for p in teacher.parameters())
    # the loss is KD: it is not the hard-label loss alone
    assert got.item() != pytest.approx(F.cross_entropy(student(x), y).item(), rel=1e-3)


def test_kd_until_epoch_and_given_hard_loss(data, mlp):
    teacher, student = mlp(data, [16], 1), mlp(data, [8], 2)
    x, y = data.example_input(4), torch.tensor([0, 1, 2, 0])
    kd = Distiller(teacher, DistillConfig(kd_until_epoch=1))
    out = student(x)
    hard = F.cross_entropy(out, y)
    assert kd.loss(out, x, hard_loss=hard).item() == pytest.approx(kd.loss(out, x, y).item())
    kd.set_epoch(1)
    assert kd.loss(out, x, y) is not None and kd.loss(out, x, hard_loss=hard) is hard
    kd.close()


def test_hints_need_the_student_and_an_example(data, mlp):
    with pytest.raises(RecipeError, match=r"distill.hints: hints need the student"):
        Distiller(mlp(data, [8], 1), DistillConfig(hints=[{"student": 1, "teacher": 1}]))


def test_kl_on_next_token_logits_is_per_token():
    """[B, T, V] logits: classes on the last axis, the mean over every token (it was the softmax over T)."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    teacher, student = torch.nn.Linear(4, 11), torch.nn.Linear(4, 11)
    x, y = torch.randn(2, 5, 4), torch.randint(0, 11, (2, 5))
    lp, lq = F.log_softmax(teacher(x) / 2, -1), F.log_softmax(student(x) / 2, -1)
    want = 4 * (lp.exp() * (lp - lq)).sum(-1).mean()
    for loss in ("kl", "soft_ce", "token_kl"):
        with Distiller(teacher, DistillConfig(loss=loss, temperature=2, alpha=0.0)) as kd:
            got = kd.loss(student(x), x, y)
        entropy = 4 * -(lp.exp() * lp).sum(-1).mean() if loss == "soft_ce" else 0.0
        assert torch.allclose(got, want + entropy, atol=1e-5), loss


def test_padded_positions_are_left_out_of_the_token_kd_term():
    torch.manual_seed(0)
    teacher, student = torch.nn.Linear(4, 11), torch.nn.Linear(4, 11)
    x, y = torch.randn(2, 5, 4), torch.randint(0, 11, (2, 5))
    y[1, 3:] = -100  # padding after the last real token of the second row
    cfg = DistillConfig(loss="token_kl", temperature=1, alpha=0.0)
    with Distiller(teacher, cfg) as kd:
        got = kd.loss(student(x), x, hard_loss=torch.tensor(0.0), targets=y)
        by_mask = kd.loss(student(x), x, hard_loss=torch.tensor(0.0), mask=y != -100)
    keep = y != -100
    lp, lq = F.log_softmax(teacher(x)[keep], -1), F.log_softmax(student(x)[keep], -1)
    want = (lp.exp() * (lp - lq)).sum(-1).mean()
    assert torch.allclose(got, want, atol=1e-6) and torch.allclose(by_mask, want, atol=1e-6)
