"""Teachers: ensemble weights, frozen flags, cached outputs."""
import pytest
import torch
import torch.nn.functional as F

from compress import DistillConfig
from compress.errors import RecipeError
from compress.kd.hook import DistillHook
from compress.kd.teachers import IndexedDataset, cache_reason, frozen, teacher_weights
from compress.trainer import Batch


def test_ensemble_weights_are_normalized_in_the_hook(data, mlp):
    t1, t2, s = mlp(data, [8], 1), mlp(data, [8], 2), mlp(data, [8], 3)
    cfg = DistillConfig(temperature=2.0, teacher_weights=[3, 1])
    w = teacher_weights(cfg.teacher_weights, 2, "distill")
    assert w == [0.75, 0.25]
    x = data.example_input(4)
    hook = DistillHook(s, [t1, t2], cfg, w, x)
    with frozen([t1, t2]):
        target, _ = hook.teacher_outputs(x)
        want = 0.75 * F.softmax(t1(x) / 2, 1) + 0.25 * F.softmax(t2(x) / 2, 1)
    assert torch.allclose(target, want, atol=1e-6)


def test_cached_teacher_gives_the_same_loss_as_the_live_teacher(data, mlp):
    teacher, student = mlp(data, [16, 16], 1), mlp(data, [8, 6], 2)
    cfg = DistillConfig(hints=[{"student": "2", "teacher": "2"}])
    with frozen([teacher]):
        hook = DistillHook(student, [teacher], cfg, [1.0], data.example_input(2))
        hook.build_cache(data, torch.device("cpu"))
        ds = IndexedDataset(data.train)
        idx = torch.tensor([5, 0, 17, 3])
        x = torch.stack([ds[i][0] for i in idx.tolist()])
        y = torch.stack([ds[i][1] for i in idx.tolist()])
        assert [ds[i][2] for i in idx.tolist()] == idx.tolist()
        out = student(x)
        hard = F.cross_entropy(out, y)
        cached = hook.loss(None, Batch(x, y, idx), out, hard)
        live = hook.loss(None, Batch(x, y, None), out, hard)
    assert cached.item() == pytest.approx(live.item(), rel=1e-5)
    assert cached.item() != pytest.approx(hard.item())


def test_teacher_weights_default_to_equal_and_bad_ones_name_the_key():
    assert teacher_weights(None, 4, "distill") == [0.25] * 4
    with pytest.raises(RecipeError, match=r"^stages\[1\]\.distill\.teacher_weights: has 1 weights for 2 teachers$"):
        teacher_weights([1.0], 2, "stages[1].distill")
    with pytest.raises(RecipeError, match=r"teacher_weights: must not all be zero"):
        teacher_weights([0, 0], 2, "distill")


def test_frozen_teachers_get_their_flags_back_even_after_an_error(data, mlp):
    teacher = mlp(data, [8], 1).train()
    next(teacher.parameters()).requires_grad_(False)  # a partly frozen teacher stays partly frozen
    flags = [p.requires_grad for p in teacher.parameters()]
    with pytest.raises(RuntimeError), frozen([teacher]):
        assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
        raise RuntimeError("boom")
    assert teacher.training and [p.requires_grad for p in teacher.parameters()] == flags


def test_cache_reason_names_why_outputs_cannot_be_cached(data):
    assert cache_reason(False, data) is None
    assert "augments" in cache_reason(True, data)
    assert cache_reason(False, data, hints=True) is None  # default_collate: one shape per batch


def test_hints_are_not_cached_when_a_collate_gives_batches_of_varying_shape(data):
    import dataclasses

    from compress.data.text import PadCollate

    padded = dataclasses.replace(data, collate=PadCollate(0))  # pads to each batch's longest
    assert "vary in shape" in cache_reason(False, padded, hints=True)
    assert cache_reason(False, padded) is None  # logits do not depend on the padded length
    assert cache_reason(False, dataclasses.replace(data, collate=PadCollate(0, 16)), hints=True) is None
