"""The distill stage: teacher cache, assistant chains, early-stopped teachers, recipe errors.

Loss formulas, the hook and teacher handling are tested in tests/kd/.
"""
import pytest
import torch

from compress import DistillConfig, create_data, create_model, distill
from compress.checkpoint import load_model
from compress.errors import RecipeError, RecipeErrors
from compress.measure.config import BenchmarkConfig
from compress.pipeline import Pipeline
from compress.recipe import parse_recipe

QUIET = {"progress": False}


@pytest.fixture(scope="module")
def data():
    return create_data({"name": "synthetic", "num_samples": 96, "num_classes": 3, "shape": [1, 4, 4], "batch_size": 16})


def mlp(data, hidden, seed=0):
    torch.manual_seed(seed)
    return create_model("mlp", data.input_shape, data.num_outputs, hidden=hidden)


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
    with pytest.raises(RecipeError, match=r"^distill\.loss: 'regression' needs real-valued targets but the data is a "
                                          r"classification task; use kl, mse_logits or soft_ce$"):
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


# -- text: hint features are [B, T, D] with T each batch's padded length ------------------------------------
BERT = {"model_type": "bert", "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
        "intermediate_size": 32, "max_position_embeddings": 32, "vocab_size": 300}


def _text_csv(path):
    words = ["good", "bad", "the", "movie", "was", "a", "plot", "dull"]
    rows = [" ".join(words[(i + j) % 8] for j in range(1 + i % 9)) for i in range(48)]
    path.write_text("text,label\n" + "".join(f"{t},{'pos' if 'good' in t else 'neg'}\n" for t in rows))
    return str(path)


@pytest.mark.parametrize("padding, cached", [("longest", False), ("max_length", True)])
def test_text_hints_cache_only_with_fixed_length_batches_and_logits_always_cache(tmp_path, padding, cached):
    pytest.importorskip("transformers", reason="transformers is the optional extra compress[hf]")
    text = create_data({"name": "text", "path": _text_csv(tmp_path / "t.csv"), "max_length": 16, "padding": padding,
                        "batch_size": 8, "tokenizer": {"vocab_size": 300}})
    torch.manual_seed(0)
    teacher, student = (create_model({"name": "hf", "config": BERT}, text.input_shape, 2) for _ in range(2))
    layer = "model.bert.encoder.layer.0"
    cfg = DistillConfig(epochs=1, hints=[{"student": layer, "teacher": layer}], **QUIET)
    metrics = distill(student, teacher, cfg, text).metrics  # batches of 9 and 11 tokens used to fail here
    assert metrics["teacher_cache"] is cached
    assert cached or "vary in shape" in metrics["teacher_cache_off"]
    assert distill(student, teacher, DistillConfig(epochs=1, **QUIET), text).metrics["teacher_cache"]  # logits: [B, C]
    if not cached:
        with pytest.raises(RecipeError, match=r"^distill\.cache_teacher: is true but hints are set"):
            distill(student, teacher, cfg.model_copy(update={"cache_teacher": True}), text)
        recipe = {"name": "t", "data": {"name": "text", "path": _text_csv(tmp_path / "t.csv")},
                  "teacher": {"name": "hf", "config": BERT}, "model": {"name": "hf", "config": BERT},
                  "stages": [{"distill": {"cache_teacher": True, "hints": [{"student": layer, "teacher": layer}]}}]}
        with pytest.raises(RecipeErrors, match=r"^stages\[0\]\.distill\.cache_teacher: is true but hints[^\n]*$"):
            parse_recipe(recipe)  # one line, before anything runs
