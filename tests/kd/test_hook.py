"""The KD hook: loss terms, frozen teachers, hint capture, kd_hook for other stages, kd_until_epoch."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from compress import DistillConfig, create_data, create_model, distill
from compress.kd import KDConfig, kd_hook
from compress.kd.hook import DistillHook
from compress.kd.teachers import frozen
from compress.trainer import Batch

QUIET = {"progress": False}


def test_regression_kd_masks_missing_targets_but_matches_the_teacher_everywhere(mlp):
    data = create_data({"name": "synthetic", "task": "regression", "num_samples": 64, "num_classes": 2, "shape": [4]})
    student, teacher = mlp(data, [4], 0), mlp(data, [4], 1)
    cfg = DistillConfig(loss="regression", beta=0.5)
    x = data.example_input(3)
    y = torch.tensor([[1.0, float("nan")], [float("nan"), 2.0], [0.5, -1.0]])
    hook = DistillHook(student, [teacher], cfg, [1.0], x)
    out = student(x)
    hard = ((out - y)[~y.isnan()] ** 2).mean()  # what the trainer's masked_mse gives
    with torch.no_grad():
        t = teacher(x)
    got = hook.loss(None, Batch(x, y), out, hard)
    assert got.item() == pytest.approx(hard.item() + 0.5 * ((out - t) ** 2).mean().item(), rel=1e-6)


# -- teacher frozen, gradients, hooks --------------------------------------------------------------
def test_gradients_reach_the_student_only_and_the_teacher_is_unchanged(data, mlp):
    teacher, student = mlp(data, [16], 1), mlp(data, [8], 2)
    teacher.train()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    x, y = data.example_input(4), torch.tensor([0, 1, 2, 0])
    with frozen([teacher]):
        assert not teacher.training
        hook = DistillHook(student, [teacher], DistillConfig(), [1.0], x)
        out = student(x)
        hook.loss(None, Batch(x, y), out, F.cross_entropy(out, y)).backward()
        assert all(p.grad is None for p in teacher.parameters())
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert teacher.training and all(p.requires_grad for p in teacher.parameters())  # flags come back
    distill(student, teacher, DistillConfig(epochs=1, **QUIET), data)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())


def test_hint_hooks_capture_the_named_layers_and_adapt_widths(data, mlp):
    teacher, student = mlp(data, [12, 10], 1), mlp(data, [6, 5], 2)
    cfg = DistillConfig(hints=[{"student": 2, "teacher": "4"}])  # outputs of the ReLUs after each hidden layer
    x = data.example_input(4)
    hook = DistillHook(student, [teacher], cfg, [1.0], x)
    assert isinstance(hook.adapters[0], nn.Linear) and hook.adapters[0].weight.shape == (10, 6)
    with torch.no_grad():
        student.train()
        student(x)
        _, feats = hook.teacher_outputs(x)
        assert torch.equal(hook._s_feats[0], student[2](student[1](student[0](x))))
        assert torch.equal(feats[0], teacher[4](teacher[3](teacher[2](teacher[1](teacher[0](x))))))
    assert hook._input is x  # the student's (possibly augmented) input is what the teacher sees
    assert len(list(hook.parameters())) == 2
    hook.close()


def test_conv_hints_get_a_1x1_conv_adapter():
    data = create_data({"name": "synthetic", "num_samples": 32, "num_classes": 3, "shape": [1, 8, 8]})
    teacher = create_model("smallcnn", data.input_shape, 3, widths=[8, 16])
    student = create_model("smallcnn", data.input_shape, 3, widths=[4, 4])
    cfg = DistillConfig(hints=[{"student": "features.2", "teacher": "features.2"}])
    hook = DistillHook(student, [teacher], cfg, [1.0], data.example_input(2))
    assert isinstance(hook.adapters[0], nn.Conv2d) and hook.adapters[0].kernel_size == (1, 1)
    assert (hook.adapters[0].in_channels, hook.adapters[0].out_channels) == (4, 8)


def test_kd_hook_follows_the_trainers_model_and_freezes_the_teacher_per_fit(data, mlp):
    """prune trains a reverted copy after max_drop and deep-copies the student between fits."""
    from types import SimpleNamespace

    teacher, student = mlp(data, [16], 1).train(), mlp(data, [8], 2)
    hook = kd_hook(student, teacher, KDConfig(alpha=0.3), data, path="prune.kd")
    assert (hook.cfg.loss, hook.cfg.alpha) == ("kl", 0.3)  # auto: kl for class labels
    assert not student._forward_pre_hooks  # nothing attached to the student until a fit starts
    other = mlp(data, [8], 3)
    trainer = SimpleNamespace(model=other, device=torch.device("cpu"))
    hook.on_fit_start(trainer)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    x = data.example_input(4)
    other.train()(x)
    assert hook._input is x
    hook.on_fit_end(trainer)
    assert teacher.training and all(p.requires_grad for p in teacher.parameters())
    assert not other._forward_pre_hooks


def test_kd_until_epoch_switches_to_hard_labels(data, mlp):
    teacher, student = mlp(data, [16], 1), mlp(data, [8], 2)
    x, y = data.example_input(4), torch.tensor([0, 1, 2, 0])
    hook = DistillHook(student, [teacher], DistillConfig(kd_until_epoch=1), [1.0], x)
    out = student(x)
    hard = F.cross_entropy(out, y)
    hook.on_epoch_start(None, 0)
    assert hook.loss(None, Batch(x, y), out, hard).item() != pytest.approx(hard.item())
    hook.on_epoch_start(None, 1)  # epoch 2 of the run
    assert hook.loss(None, Batch(x, y), out, hard) is hard


def test_kd_config_keeps_a_given_loss_and_picks_auto_by_task():
    assert KDConfig().resolved("classification").loss == "kl"
    assert KDConfig().resolved("regression").loss == "regression"
    assert KDConfig(loss="mse_logits").resolved("classification").loss == "mse_logits"


def test_a_cnn_teacher_hints_a_vit_student_through_pooled_features():
    """[B, C, H, W] maps for [B, T, D] tokens: both pooled to [B, width], a linear map between widths."""
    pytest.importorskip("timm", reason="timm is the optional extra compress[timm]")
    data = create_data({"name": "synthetic", "num_samples": 32, "num_classes": 3, "shape": [1, 8, 8], "batch_size": 8})
    teacher = create_model("smallcnn", data.input_shape, 3, widths=[4, 6])
    student = create_model({"name": "timm:vit_tiny_patch16_224",
                            "kwargs": {"img_size": 8, "patch_size": 4, "embed_dim": 16, "depth": 1, "num_heads": 2}},
                           data.input_shape, 3)
    cfg = DistillConfig(epochs=1, hints=[{"student": "blocks.0", "teacher": "features.2"}], **QUIET)
    x = data.example_input(2)
    hook = DistillHook(student, [teacher], cfg, [1.0], x)
    linear = hook.adapters[0][1]
    assert isinstance(linear, nn.Linear) and (linear.in_features, linear.out_features) == (16, 4)
    with torch.no_grad():
        student.train()(x)
        _, feats = hook.teacher_outputs(x)
        t_map = teacher.features[2](teacher.features[1](teacher.features[0](x)))
    assert torch.allclose(feats[0], t_map.mean((2, 3)))  # the teacher's map, averaged over space
    assert hook.adapters[0](hook._s_feats[0]).shape == feats[0].shape == (2, 4)
    hook.close()
    _, metrics = distill(student, teacher, cfg, data)  # and it trains, teacher outputs cached
    assert metrics["teacher_cache"] is True


def test_hint_features_without_a_batch_and_feature_axis_are_refused():
    from compress.errors import RecipeError
    from compress.kd.hook import _adapter

    with pytest.raises(RecipeError, match="hints.0.: .*batch axis"):
        _adapter(torch.Size([4]), torch.Size([4, 3, 2, 2]), "hints[0]")
