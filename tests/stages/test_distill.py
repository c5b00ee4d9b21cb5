"""The distill stage: loss formulas, frozen teachers, hint capture, ensembles, cache, chains, errors."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from compress import DistillConfig, create_data, create_model, distill
from compress.checkpoint import load_model
from compress.distill_losses import combine, kd_term, teacher_target
from compress.errors import RecipeError, RecipeErrors
from compress.measure.config import BenchmarkConfig
from compress.pipeline import Pipeline
from compress.recipe import parse_recipe
from compress.stages.distill import DistillHook, IndexedDataset, frozen
from compress.trainer import Batch

QUIET = {"progress": False}


def softmax(v):
    e = [math.exp(x) for x in v]
    return [x / sum(e) for x in e]


@pytest.fixture(scope="module")
def data():
    return create_data({"name": "synthetic", "num_samples": 96, "num_classes": 3, "shape": [1, 4, 4], "batch_size": 16})


def mlp(data, hidden, seed=0):
    torch.manual_seed(seed)
    return create_model("mlp", data.input_shape, data.num_outputs, hidden=hidden)


# -- formulas --------------------------------------------------------------------------------------
def test_kl_term_matches_hand_computation_with_t_squared():
    s, t, T = [1.0, 2.0, 0.5], [3.0, 1.0, 0.0], 2.0
    p, q = softmax([v / T for v in t]), softmax([v / T for v in s])
    kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    target = teacher_target([torch.tensor([t])], [1.0], T, "kl")
    got = kd_term(torch.tensor([s]), target, T, "kl")
    assert got.item() == pytest.approx(T * T * kl, rel=1e-5)
    # soft cross-entropy differs from KL by the teacher's entropy (times T^2), not by its gradients
    h = -sum(pi * math.log(pi) for pi in p)
    assert kd_term(torch.tensor([s]), target, T, "soft_ce").item() == pytest.approx(T * T * (kl + h), rel=1e-5)


def test_kd_terms_average_over_the_batch_and_mix_with_alpha():
    s = torch.tensor([[1.0, 2.0, 0.5], [0.0, 0.0, 3.0]])
    t = torch.tensor([[3.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    target = teacher_target([t], [1.0], 3.0, "kl")
    rows = [kd_term(s[i:i + 1], target[i:i + 1], 3.0, "kl") for i in range(2)]
    assert kd_term(s, target, 3.0, "kl").item() == pytest.approx((rows[0] + rows[1]).item() / 2, rel=1e-6)
    assert kd_term(s, t, 3.0, "mse_logits").item() == pytest.approx(((s - t) ** 2).mean().item())
    hard, soft = torch.tensor(2.0), torch.tensor(10.0)
    assert combine(hard, soft, "kl", 0.25, 99.0).item() == pytest.approx(0.25 * 2 + 0.75 * 10)
    assert combine(hard, soft, "regression", 0.25, 0.5).item() == pytest.approx(2 + 0.5 * 10)


def test_ensemble_averages_soft_targets_with_weights():
    a, b = torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor([[0.0, 0.0, 4.0]])
    target = teacher_target([a, b], [0.75, 0.25], 2.0, "kl")
    want = 0.75 * torch.tensor(softmax([1.0, 0, 0])) + 0.25 * torch.tensor(softmax([0, 0, 2.0]))
    assert torch.allclose(target[0], want, atol=1e-6)
    assert teacher_target([a, b], [0.5, 0.5], 2.0, "mse_logits").tolist() == [[1.0, 0.0, 2.0]]


def test_ensemble_weights_are_normalized_in_the_hook(data):
    t1, t2, s = mlp(data, [8], 1), mlp(data, [8], 2), mlp(data, [8], 3)
    cfg = DistillConfig(temperature=2.0, teacher_weights=[3, 1])
    from compress.stages.distill import _teacher_weights

    w = _teacher_weights(cfg, 2, "distill")
    assert w == [0.75, 0.25]
    x = data.example_input(4)
    hook = DistillHook(s, [t1, t2], cfg, w, x)
    with frozen([t1, t2]):
        target, _ = hook.teacher_outputs(x)
        want = 0.75 * F.softmax(t1(x) / 2, 1) + 0.25 * F.softmax(t2(x) / 2, 1)
    assert torch.allclose(target, want, atol=1e-6)


def test_regression_kd_masks_missing_targets_but_matches_the_teacher_everywhere():
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
def test_gradients_reach_the_student_only_and_the_teacher_is_unchanged(data):
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


def test_hint_hooks_capture_the_named_layers_and_adapt_widths(data):
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


def test_kd_hook_follows_the_trainers_model_and_freezes_the_teacher_per_fit(data):
    """prune trains a reverted copy after max_drop and deep-copies the student between fits."""
    from types import SimpleNamespace

    from compress.stages.distill import KDOptions, kd_hook

    teacher, student = mlp(data, [16], 1).train(), mlp(data, [8], 2)
    hook = kd_hook(student, teacher, KDOptions(alpha=0.3), data, path="prune.distill")
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


# -- cache, early-stopped KD -----------------------------------------------------------------------
def test_cached_teacher_gives_the_same_loss_as_the_live_teacher(data):
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


def test_distill_uses_the_cache_only_when_the_data_is_deterministic(data):
    from compress.stages.distill import _fit

    teacher = mlp(data, [16], 1)
    calls = []
    teacher.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    info = _fit(mlp(data, [8], 2), [teacher], DistillConfig(epochs=2, **QUIET), data, path="distill")
    assert info["teacher_cache"] and sum(calls) == 2 + len(data.train)  # shape probe + one pass
    calls.clear()
    info = _fit(mlp(data, [8], 2), [teacher], DistillConfig(epochs=2, cache_teacher=False, **QUIET), data, path="distill")
    assert not info["teacher_cache"] and sum(calls) == 2 + 2 * len(data.train)


def test_kd_until_epoch_switches_to_hard_labels(data):
    teacher, student = mlp(data, [16], 1), mlp(data, [8], 2)
    x, y = data.example_input(4), torch.tensor([0, 1, 2, 0])
    hook = DistillHook(student, [teacher], DistillConfig(kd_until_epoch=1), [1.0], x)
    out = student(x)
    hard = F.cross_entropy(out, y)
    hook.on_epoch_start(None, 0)
    assert hook.loss(None, Batch(x, y), out, hard).item() != pytest.approx(hard.item())
    hook.on_epoch_start(None, 1)  # epoch 2 of the run
    assert hook.loss(None, Batch(x, y), out, hard) is hard


# -- recipes: chains, early-stopped teachers, errors ------------------------------------------------
def chain_recipe(tiny_recipe, **distill_opts):
    r = dict(tiny_recipe)
    r["data"] = {**r["data"], "num_samples": 96}
    r["teacher"] = {"name": "mlp", "hidden": [32]}
    fast = {"latency": False, "macs": False, "zipped": False}  # report extras another test file covers
    r["benchmark"] = {k: v for k, v in fast.items() if k in BenchmarkConfig.model_fields}
    r["stages"] = [
        {"train": {"target": "teacher", "epochs": 2, "save_every_epoch": True, **QUIET}},
        {"distill": {"epochs": 1, "student": {"name": "mlp", "hidden": [12]}, **QUIET, **distill_opts}},
        {"distill": {"epochs": 1, "teacher": "previous", "student": {"name": "mlp", "hidden": [4]}, **QUIET}},
    ]
    return r


def test_teacher_assistant_chain_runs_and_each_student_is_new(tmp_path, tiny_recipe):
    report = Pipeline.from_dict(chain_recipe(tiny_recipe, teacher_epoch=1)).run(tmp_path / "run")
    rows = report["stages"]
    assert [r["name"] for r in rows] == ["train", "distill", "distill"]
    assert rows[1]["params"] == 36 * 12 + 12 + 12 * 3 + 3 and rows[2]["params"] == 36 * 4 + 4 + 4 * 3 + 3
    assert rows[2]["teacher_cache"] is True and rows[2]["kd_loss"] == "kl"
    assert load_model(tmp_path / "run/stages/02_distill/model.pt")[1].out_features == 4


def test_teacher_epoch_loads_that_epochs_checkpoint(tmp_path, tiny_recipe, monkeypatch):
    import compress.stages.distill as mod

    seen = []
    real = mod._fit
    monkeypatch.setattr(mod, "_fit", lambda s, ts, *a, **k: (seen.append([t.state_dict() for t in ts]), real(s, ts, *a, **k))[1])
    recipe = chain_recipe(tiny_recipe, teacher_epoch=1)
    recipe["stages"] = recipe["stages"][:2]
    Pipeline.from_dict(recipe).run(tmp_path / "run")
    epoch1 = load_model(tmp_path / "run/stages/00_train/epoch001.pt").state_dict()
    epoch2 = load_model(tmp_path / "run/stages/00_train/epoch002.pt").state_dict()
    assert all(torch.equal(v, epoch1[k]) for k, v in seen[0][0].items())
    assert not all(torch.equal(v, epoch2[k]) for k, v in seen[0][0].items())


@pytest.mark.parametrize("opts, path, message", [
    ({"temperature": 0}, "stages[1].distill.temperature", "expected a number > 0, got 0"),
    ({"alpha": 1.5}, "stages[1].distill.alpha", "expected a number in [0, 1], got 1.5"),
    ({"alpha": -0.1}, "stages[1].distill.alpha", "in [0, 1]"),
    ({"loss": "kld"}, "stages[1].distill.loss", "did you mean 'kl'"),
    ({"teacher": "prev"}, "stages[1].distill.teacher", "expected 'recipe', 'previous'"),
    ({"teacher": [{"name": "mlp"}]}, "stages[1].distill.teacher[0].checkpoint", "needs trained weights"),
    ({"teacher": ["recipe", "recipe"], "teacher_weights": [1]}, "stages[1].distill.teacher_weights", "1 weights for 2"),
    ({"teacher_epoch": 3}, "stages[1].distill.teacher_epoch", "trains the teacher for 2 epochs"),
    ({"cache_teacher": True, "augment": {"random_shift": 1}}, "stages[1].distill.cache_teacher", "augments"),
    ({"teacher": "previous", "student": None}, "stages[1].distill.student", "required with teacher: previous"),
])
def test_bad_options_name_the_key_path(tiny_recipe, opts, path, message):
    with pytest.raises((RecipeError, RecipeErrors)) as exc:
        parse_recipe(chain_recipe(tiny_recipe, **opts))
    assert f"{path}: " in str(exc.value) and message in str(exc.value)


def test_bad_hint_layer_fails_before_training_with_the_layer_list(tmp_path, tiny_recipe):
    recipe = chain_recipe(tiny_recipe, hints=[{"student": "fc9", "teacher": "1"}])
    with pytest.raises(RecipeError) as exc:
        Pipeline.from_dict(recipe).run(tmp_path / "run")
    msg = str(exc.value)
    assert msg.startswith("stages[1].distill.hints[0].student: no layer 'fc9' in the student; layers are 0, 1, 2")
    assert not (tmp_path / "run/stages/01_distill/model.pt").exists()


def test_teacher_with_other_outputs_is_rejected(data):
    wrong = create_model("mlp", data.input_shape, 5, hidden=[8])
    with pytest.raises(RecipeError, match=r"^distill\.teacher\[1\]: the teacher's outputs have shape \(5,\) per example "
                                          r"but the student's have \(3,\)"):
        distill(mlp(data, [8]), [mlp(data, [8], 1), wrong], DistillConfig(epochs=1, **QUIET), data)
    with pytest.raises(RecipeError, match=r"^distill\.loss: is 'regression' but the data is a classification task"):
        distill(mlp(data, [8]), mlp(data, [8], 1), DistillConfig(loss="regression", **QUIET), data)


def test_student_can_be_deep_copied_during_a_fit(data):
    """EMA/snapshot hooks copy the model mid-fit: the KD hook must not make that fail (or copy the teacher)."""
    import copy

    from compress.trainer import Hook

    copies = []

    class Snapshot(Hook):
        def on_epoch_end(self, trainer, epoch, metrics):
            copies.append(copy.deepcopy(trainer.model))

    teacher = mlp(data, [16], 1)
    distill(mlp(data, [8], 2), teacher, DistillConfig(epochs=1, progress=False), data, hooks=[Snapshot()])
    assert len(copies) == 1


def test_a_bad_student_hint_name_leaves_no_hook_on_the_teacher(data):
    teacher, student = mlp(data, [16], 1), mlp(data, [8], 2)
    with pytest.raises((RecipeError, RecipeErrors), match=r"hints\[0\]\.student"):
        distill(student, teacher, DistillConfig(epochs=1, progress=False, hints=[{"student": "nope", "teacher": "2"}]), data)
    assert not any(m._forward_hooks for m in teacher.modules())
    assert not any(m._forward_pre_hooks for m in student.modules())


def test_alpha_with_the_regression_loss_warns_that_it_has_no_effect():
    data = create_data({"name": "synthetic", "task": "regression", "num_samples": 32, "num_classes": 2, "shape": [4]})
    with pytest.warns(UserWarning, match=r"^distill\.alpha: has no effect with the regression loss"):
        distill(mlp(data, [8]), mlp(data, [8], 1), DistillConfig(loss="regression", alpha=0.3, epochs=1, progress=False), data)
