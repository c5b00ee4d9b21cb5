import pytest
import torch
import yaml
from click.testing import CliRunner

import compress.stages.prune as prune_mod
from compress import Pipeline, PruneConfig, TrainConfig, create_data, create_model, load_model, prune
from compress.errors import RecipeError, RecipeErrors
from compress.pruning.masks import prunable_layers
from compress.recipe import parse_recipe

NO_TRAIN = TrainConfig(epochs=0, progress=False)
DATA = {"name": "synthetic", "num_samples": 160, "num_classes": 4, "shape": [1, 12, 12], "batch_size": 32, "noise": 0.3}


@pytest.fixture(scope="module")
def data():
    return create_data(DATA)


def _recipe(prune_opts: dict, stages_before=({"train": {"epochs": 1, "progress": False}},)) -> dict:
    return {"name": "p", "data": DATA, "model": {"name": "lenet5"}, "benchmark": {"latency": False},  # keep it fast
            "stages": [*stages_before, {"prune": prune_opts}]}


def _errors(doc: dict) -> list[str]:
    with pytest.raises((RecipeErrors, RecipeError)) as e:
        parse_recipe(doc)
    return str(e.value).splitlines()


def test_bad_options_name_the_key_path():
    assert _errors(_recipe({"sparsity": 1.0})) == ["stages[1].prune.sparsity: expected a number in [0, 1), got 1.0"]
    assert _errors(_recipe({"sparsity": "high"})) == ["stages[1].prune.sparsity: expected a number in [0, 1), got 'high'"]
    assert _errors(_recipe({"method": "channel", "importance": "l3norm"}))[0].startswith(
        "stages[1].prune.importance: unknown importance 'l3norm'; expected one of bn_scale, l1, l2, taylor")
    # channel-only options are not magnitude's: each method is its own config class
    assert _errors(_recipe({"method": "magnitude", "importance": "l2"}))[0].startswith("stages[1].prune.importance: unknown key")
    assert _errors(_recipe({"method": "blocks"}))[0].startswith(
        "stages[1].prune.method: expected one of 'channel', 'decoder', 'magnitude', got 'blocks'")
    assert _errors(_recipe({"ignored_layers": ["classifier.9"]})) == [
        "stages[1].prune.ignored_layers[0]: no layer named 'classifier.9' in the model; prunable layers are "
        "features.0, features.3, classifier.1, classifier.3, classifier.5; did you mean 'classifier.5'?"]
    assert _errors(_recipe({"layer_ratios": {"features.0": 1.2}})) == [
        "stages[1].prune.layer_ratios.features.0: expected a number in [0, 1), got 1.2"]
    assert _errors(_recipe({"method": "magnitude", "budget": {"kind": "macs", "reduction": 2}}))[0].startswith(
        "stages[1].prune.budget.kind: 'macs' needs method 'channel'")
    assert _errors(_recipe({"budget": {"kind": "params"}})) == [
        "stages[1].prune.budget: give exactly one of 'max' (absolute) or 'reduction' (times smaller than the unpruned model)"]


def test_python_api_checks_layer_names(data):
    model = create_model("lenet5", data.input_shape, data.num_outputs)
    with pytest.raises(RecipeError, match=r"^prune.ignored_layers\[0\]: no layer named 'nope'"):
        prune(model, PruneConfig(ignored_layers=["nope"], finetune=NO_TRAIN), data)


def _fake_scores(monkeypatch, hits: list[torch.Tensor]) -> list[str]:
    """The gate scores these constructed predictions (reference first, then step 1, 2...); returns which
    fine-tune each scored model had last (the names of its Trainer fits)."""
    from compress.pruning.gate import Scores

    seen, queue, real_trainer = [], iter(hits), prune_mod.Trainer

    class Spy(real_trainer):
        def fit(self):
            self.model._last_fit = (self.name.split(":")[-1], self.cfg)
            return super().fit()

    def fake(model, data_, split, device):
        seen.append(getattr(model, "_last_fit", None))
        h = next(queue)
        return Scores(h.float().mean().item(), h)

    monkeypatch.setattr(prune_mod, "Trainer", Spy)
    monkeypatch.setattr(prune_mod.gate, "score", fake)
    return seen


def _hits(n: int, wrong: int) -> torch.Tensor:
    h = torch.ones(n, dtype=torch.bool)
    h[:wrong] = False
    return h


def test_stops_at_the_first_step_whose_drop_is_beyond_max_drop_and_noise(data, monkeypatch):
    # 800 samples: reference 8 wrong; step 1: 9; step 2: 14 (6 newly wrong: 0.0075 > max_drop, p = 1/64 < 0.05);
    # step 3: 60. Constructed predictions, so the rule is what is tested, not this tiny model's accuracy.
    _fake_scores(monkeypatch, [_hits(800, 8), _hits(800, 9), _hits(800, 14), _hits(800, 60)])
    model = create_model("mlp", data.input_shape, data.num_outputs, hidden=[64])
    pruned, m = prune(model, PruneConfig(sparsity=0.8, steps=4, schedule="linear", max_drop=0.005, finetune=NO_TRAIN), data)
    assert [s["kept"] for s in m["steps"]] == [True, False]  # steps 3-4 never ran
    assert m["steps_done"] == 1
    assert m["stop_reason"] == ("kept 1 of 4 steps; step 2 undone: val accuracy fell 0.0075 (max_drop 0.005) on 800 "
                                "samples: 6 newly wrong vs 0 newly right, one-sided exact McNemar p=0.0156 (< 0.05) "
                                "below the unpruned model's 0.9900")
    row = m["steps"][1]
    assert (row["gate_n"], row["gate_worse"], row["gate_better"]) == (800, 6, 0) and row["p_value"] == pytest.approx(1 / 64)
    # the model of the last good step (1 of 4 linear steps: 20% of the prunable weights)
    assert m["weight_sparsity"] == pytest.approx(0.2, abs=0.01)
    assert pruned(data.example_input(2)).shape == (2, data.num_outputs)


def test_a_drop_past_max_drop_within_noise_is_kept(data, monkeypatch):
    # step 1 loses 6 of 800 samples but also gains 4: 10 vs 4 disagreements, p = 0.09, a coin does that
    ref = _hits(800, 8)
    step = ref.clone()
    step[:4], step[8:18] = True, False
    _fake_scores(monkeypatch, [ref, step])
    model = create_model("mlp", data.input_shape, data.num_outputs, hidden=[64])
    _, m = prune(model, PruneConfig(sparsity=0.5, steps=1, max_drop=0.005, finetune=NO_TRAIN), data)
    assert m["steps"][0]["kept"] and m["steps"][0]["drop"] == pytest.approx(0.0075)
    assert m["steps"][0]["p_value"] == pytest.approx(0.0898, abs=1e-4) and m["stop_reason"] == "schedule finished"


def test_the_reference_is_fine_tuned_and_scored_like_every_step(data, monkeypatch):
    """Not the unpruned model as it came (an earlier stage's best epoch, chosen on these same samples)."""
    seen = _fake_scores(monkeypatch, [_hits(100, 0)] * 3)
    ft = TrainConfig(epochs=1, progress=False, optimizer={"lr": 1e-4})
    model = create_model("mlp", data.input_shape, data.num_outputs, hidden=[64])
    _, m = prune(model, PruneConfig(sparsity=0.5, steps=2, max_drop=0.01, finetune=ft), data)
    assert seen == [("reference", ft), ("step1", ft), ("step2", ft)]
    assert m["unpruned_val_accuracy"] == 1.0  # the fine-tuned reference's score


def test_budget_stops_pruning_once_met(data):
    model = create_model("lenet5", data.input_shape, data.num_outputs, width=2)
    _, m = prune(model, PruneConfig(method="channel", sparsity=0.8, steps=4, schedule="linear", scope="layer",
                                    budget={"kind": "macs", "reduction": 2}, finetune=NO_TRAIN), data)
    assert m["stop_reason"].endswith("macs budget met") and m["steps_done"] < 4
    assert m["macs_reduction"] >= 2
    # it stopped at the first step that met the budget: every earlier step was still above it
    assert all(s["macs"] > m["unpruned_macs"] / 2 for s in m["steps"][:-1])


def test_a_budget_lands_within_5_percent_instead_of_a_step_past_it(data):
    model = create_model("small_resnet", data.input_shape, data.num_outputs, widths=[16, 32])
    # one step to half the channels would be ~3.5x fewer MACs: the step is shrunk by bisection to land on 2x
    _, m = prune(model, PruneConfig(method="channel", sparsity=0.5, steps=1, round_to=1,
                                    budget={"kind": "macs", "reduction": 2}, finetune=NO_TRAIN), data)
    assert 2.0 <= m["unpruned_macs"] / m["macs"] <= 2.1 and m["stop_reason"] == "step 1: macs budget met"
    assert m["steps"][0]["target"] < 0.5
    model = create_model("small_resnet", data.input_shape, data.num_outputs, widths=[16, 32])
    # global ranking: finer steps than every layer alike, whose widths move together
    _, m = prune(model, PruneConfig(method="channel", sparsity=0.6, steps=3, schedule="linear", round_to=1, scope="global",
                                    budget={"kind": "params", "max": 6000}, finetune=NO_TRAIN), data)
    assert 0.95 * 6000 <= m["params"] <= 6000 and m["stop_reason"].endswith("params budget met")


def test_default_round_to_comes_from_the_latency_backend_and_an_explicit_one_wins(data):
    from compress.runtime.backends import BACKENDS

    assert BACKENDS.get("onnxruntime").obj.preferred_round_to == 8 and BACKENDS.get("pytorch").obj.preferred_round_to == 1

    def widths(round_to=None, **kw):
        model = create_model("small_resnet", data.input_shape, data.num_outputs, widths=[16, 32])
        cfg = PruneConfig(method="channel", sparsity=0.3, round_to=round_to, finetune=NO_TRAIN)
        pruned, m = prune(model, cfg, data, **kw)
        return {c.out_channels for c in pruned.modules() if isinstance(c, torch.nn.Conv2d)}, m

    w, m = widths()  # the benchmark's default backends: pytorch and onnxruntime
    assert all(c % 8 == 0 for c in w) and w != {16, 32} and (m["round_to"], m["round_to_from"]) == (8, "onnxruntime")
    w, m = widths(backends=["pytorch"])
    assert any(c % 8 for c in w) and m["round_to"] == 1  # free widths where they do not matter
    w, m = widths(backends=["onnxruntime"], round_to=4)
    assert all(c % 4 == 0 for c in w) and any(c % 8 for c in w) and m["round_to"] == 4 and "round_to_from" not in m


def test_fine_tunes_distil_from_the_unpruned_model_unless_told_otherwise(data, monkeypatch):
    made = _spy_kd_hooks(monkeypatch, prune_mod)
    ft = TrainConfig(epochs=1, progress=False)
    model = create_model("mlp", data.input_shape, data.num_outputs, hidden=[16])
    _, m = prune(model, PruneConfig(sparsity=0.5, finetune=ft), data)
    (hook,) = made
    assert hook.teachers[0] is not model and m["fine_tune"] == "self-distillation from the unpruned model"
    teacher = create_model("mlp", data.input_shape, data.num_outputs, hidden=[32])
    _, m = prune(model, PruneConfig(sparsity=0.5, finetune=ft), data, teacher=teacher)  # the recipe has a teacher
    assert len(made) == 1 and m["fine_tune"] == "plain"
    off = parse_recipe(_recipe({"sparsity": 0.5, "kd": False})).stages[1].config
    assert off.kd is None and off.self_distill is False
    assert parse_recipe(_recipe({"sparsity": 0.5, "kd": True})).stages[1].config.kd.teacher == "unpruned"  # the defaults
    _, m = prune(model, off.model_copy(update={"finetune": ft}), data)
    assert len(made) == 1 and m["fine_tune"] == "plain"


def test_magnitude_stage_in_a_recipe_masks_permanent(tmp_path):
    doc = _recipe({"method": "magnitude", "sparsity": 0.9, "steps": 2, "finetune": {"epochs": 1, "progress": False},
                   "final_finetune": {"epochs": 1, "progress": False}, "kd": {"alpha": 0.5},
                   "regularize": {"kind": "l1", "strength": 1e-5}})
    report = Pipeline.from_dict(doc).run(tmp_path / "run")
    row = report["stages"][1]
    assert row["weight_sparsity"] == pytest.approx(0.9, abs=0.002)
    assert row["sparse_bytes"] < row["dense_bytes"] / 3 and row["nonzero_params"] < 0.2 * row["params"]
    model = load_model(tmp_path / "run" / "stages" / "01_prune" / "model.pt")
    assert not any(k.endswith(("_orig", "_mask")) for k in model.state_dict())  # a plain model, no reparametrization
    w = torch.cat([m.weight.flatten() for m in prunable_layers(model, ["classifier.5"]).values()])
    assert (w == 0).float().mean().item() == pytest.approx(0.9, abs=0.002)


def test_channel_stage_saves_a_smaller_model_and_sensitivity_feeds_layer_ratios(tmp_path):
    from compress.cli import cli

    doc = _recipe({"method": "channel", "sparsity": 0.5, "importance": "l1", "finetune": {"epochs": 1, "progress": False}})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(doc))
    report = Pipeline.from_dict(doc).run(tmp_path / "run")
    row = report["stages"][1]
    assert row["macs_reduction"] > 2 and row["params"] < report["stages"][0]["params"] / 2
    model = load_model(tmp_path / "run" / "stages" / "01_prune" / "model.pt")
    assert model.features[0].out_channels == 3 and model(torch.zeros(2, 1, 12, 12)).shape == (2, 4)

    out = tmp_path / "sens"
    r = CliRunner().invoke(cli, ["sensitivity", str(tmp_path / "r.yaml"), "--layers", "features.0,classifier.1",
                                 "--ratios", "0.25,0.5", "--max-drop", "1", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert {p.name for p in out.iterdir()} == {"sensitivity.csv", "sensitivity.md", "sensitivity.png", "layer_ratios.yaml"}
    assert len((out / "sensitivity.csv").read_text().splitlines()) == 1 + 2 * 2
    ratios = yaml.safe_load((out / "layer_ratios.yaml").read_text())["layer_ratios"]
    assert ratios == {"features.0": 0.5, "classifier.1": 0.5}  # max_drop 1: everything tolerated
    doc["stages"][1]["prune"]["layer_ratios"] = ratios
    parse_recipe(doc)  # accepted as a prune stage's per-layer ratios

    bad = CliRunner().invoke(cli, ["sensitivity", str(tmp_path / "r.yaml"), "--layers", "conv9", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "--layers: no prunable layer named 'conv9'" in bad.output
    assert not (tmp_path / "x").exists()


def test_kd_teacher_is_frozen_only_during_pruning():
    """The recipe's teacher may be trained again by a later stage: its flags must come back."""
    from compress import PruneConfig, create_data, create_model, prune

    data = create_data({"name": "synthetic", "num_samples": 128, "num_classes": 3, "shape": [1, 6, 6]})
    teacher = create_model("mlp", data.input_shape, data.num_outputs, hidden=[32]).train()
    student = create_model("mlp", data.input_shape, data.num_outputs, hidden=[16])
    cfg = PruneConfig(method="magnitude", sparsity=0.5, finetune={"epochs": 1, "progress": False},
                      kd={"teacher": "recipe"})
    prune(student, cfg, data, teacher=teacher)
    assert teacher.training and all(p.requires_grad for p in teacher.parameters())


def test_kd_hook_is_closed_when_a_fine_tune_fails(monkeypatch):
    """An error inside pruning must not leave the teacher frozen or a hook on the student."""
    import copy

    data = create_data({"name": "synthetic", "num_samples": 64, "num_classes": 3, "shape": [1, 4, 4]})
    teacher = create_model("mlp", data.input_shape, data.num_outputs, hidden=[16]).train()
    student = create_model("mlp", data.input_shape, data.num_outputs, hidden=[8])

    def boom(*a, **k):
        raise RuntimeError("fine-tune failed")

    import compress.trainer

    monkeypatch.setattr(compress.trainer, "evaluate", boom)  # raises inside the fit, after the teacher froze
    cfg = PruneConfig(method="magnitude", sparsity=0.5, finetune={"epochs": 1, "progress": False},
                      kd={"teacher": "recipe"})
    with pytest.raises(RuntimeError, match="fine-tune failed"):
        prune(student, cfg, data, teacher=teacher)
    assert teacher.training and all(p.requires_grad for p in teacher.parameters())
    assert not student._forward_pre_hooks
    copy.deepcopy(student)


REG_DATA = {"name": "synthetic", "task": "regression", "num_samples": 96, "num_classes": 6, "shape": [6], "batch_size": 32}


def _spy_kd_hooks(monkeypatch, module) -> list:
    """The KD hooks ``module`` makes, in order."""
    made, real = [], module.kd_hook
    monkeypatch.setattr(module, "kd_hook", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    return made


@pytest.mark.parametrize("opts, beta", [({"beta": 0.25}, 0.25), ({"alpha": 0.2}, 1.0)])  # default beta: 1, as in distill
def test_kd_prunes_a_regression_autoencoder_with_the_regression_loss_and_beta(monkeypatch, opts, beta):
    data = create_data(REG_DATA)
    model = create_model({"name": "autoencoder", "hidden": [8], "clip": None}, data.input_shape, data.num_outputs)
    made = _spy_kd_hooks(monkeypatch, prune_mod)
    import contextlib

    # alpha weighs hard labels in classification only: setting it on a regression task earns a warning
    expect = pytest.warns(UserWarning, match="alpha: has no effect") if "alpha" in opts else contextlib.nullcontext()
    with expect:
        _, m = prune(model, PruneConfig(sparsity=0.5, finetune={"epochs": 1, "progress": False}, kd=opts), data)
    assert "rmse" in m and m["weight_sparsity"] == pytest.approx(0.5, abs=0.05)
    (hook,) = made
    assert (hook.cfg.loss, hook.cfg.beta) == ("regression", beta)


def test_kd_loss_that_does_not_fit_the_task_names_the_key():
    data = create_data(REG_DATA)
    model = create_model("mlp", data.input_shape, data.num_outputs, hidden=[8])
    with pytest.raises(RecipeError, match=r"^stages\[1\]\.prune\.kd\.loss: 'kl' needs class logits"):
        prune(model, PruneConfig(finetune=NO_TRAIN, kd={"loss": "kl"}), data, path="stages[1].prune")


def test_the_old_distill_key_still_works_and_warns_with_its_path():
    from compress.errors import RenamedKeyWarning

    opts = {"sparsity": 0.5, "finetune": {"epochs": 1}}
    with pytest.warns(DeprecationWarning, match=r"^stages\[1\]\.prune\.distill: renamed to 'kd'") as seen:
        old = parse_recipe(_recipe({**opts, "distill": {"teacher": "unpruned", "alpha": 0.7}}))
    assert all(w.category is RenamedKeyWarning for w in seen)
    new = parse_recipe(_recipe({**opts, "kd": {"teacher": "unpruned", "alpha": 0.7}}))
    assert old.stages[1].config == new.stages[1].config and new.stages[1].config.kd.alpha == 0.7
    with pytest.warns(DeprecationWarning, match=r"^prune\.distill: renamed"):
        assert PruneConfig(distill={"beta": 0.5}).kd.beta == 0.5  # the Python API too
    assert _errors(_recipe({**opts, "distill": {}, "kd": {}})) == ["stages[1].prune: give 'kd' only; 'distill' is its old name"]
    with pytest.warns(DeprecationWarning):
        assert _errors(_recipe({**opts, "distill": {"alpha": 2}})) == [
            "stages[1].prune.kd.alpha: expected a number in [0, 1], got 2"]


def test_the_cli_says_the_old_key_once_in_one_line(tmp_path):
    from compress.cli import cli

    doc = _recipe({"sparsity": 0.5, "distill": {"alpha": 0.7}})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(doc))
    r = CliRunner().invoke(cli, ["validate", str(tmp_path / "r.yaml")])
    assert r.exit_code == 0, r.output
    assert r.stderr.splitlines() == ["warning: stages[1].prune.distill: renamed to 'kd' (same options); "
                                     "the old key will go away"]


def test_latency_budget_times_warmup_then_single_calls_in_eval_mode():
    import torch.nn as nn

    from compress.stages.prune import torch_latency_ms

    class Counting(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.calls = nn.Linear(2, 2), []

        def forward(self, x):
            self.calls.append((self.training, torch.is_grad_enabled()))
            return self.fc(x)

    m = Counting().train()
    ms = torch_latency_ms(m, torch.zeros(1, 2), runs=7, warmup=3)
    assert ms > 0 and m.training  # training mode restored
    assert m.calls == [(False, False)] * 10  # 3 warm-up + 7 timed calls, eval mode, no autograd


def test_a_new_pruning_method_is_a_config_class_and_a_pruner(data):
    from compress.pruning.methods import PRUNE_METHODS, Pruner, PruneConfig as Base, register_prune_method

    class FirstHalfConfig(Base):
        """Zero the first half of every prunable layer's weights (a toy method for this test)."""

        method: str = "first_half_test"

        def pruner(self, model, layers, example, data, path, device):
            class Half(Pruner):
                def step(self, t, target):
                    for m in layers.values():
                        m.weight.data.view(-1)[: m.weight.numel() // 2] = 0
                    return []
            return Half()

    register_prune_method(FirstHalfConfig)
    try:
        cfg = PruneConfig(method="first_half_test", finetune=NO_TRAIN)
        assert type(cfg) is FirstHalfConfig
        model = create_model("lenet5", data.input_shape, data.num_outputs)
        model, m = prune(model, cfg, data)
        assert m["method"] == "first_half_test" and m["nonzero"] < m["unpruned_nonzero"]
    finally:
        PRUNE_METHODS._entries.pop("first_half_test")


def test_a_budget_without_a_sparsity_prunes_past_the_default_sparsity_until_it_lands(data):
    """Half the channels of a 2x64 MLP are 2.36x fewer MACs: a 3x budget needs more than the default 0.5."""
    def run(**kw):
        model = create_model("mlp", data.input_shape, data.num_outputs, hidden=[64, 64])
        return prune(model, PruneConfig(method="channel", round_to=1, budget={"kind": "macs", "reduction": 3},
                                        finetune=NO_TRAIN, **kw), data)[1]

    m = run()
    assert 3.0 <= m["unpruned_macs"] / m["macs"] <= 3.15 and m["stop_reason"] == "step 2: macs budget met"
    assert m["steps"][0]["target"] == 0.5 and 0.5 < m["steps"][1]["target"] < 0.9
    m = run(sparsity=0.5)  # a sparsity the recipe gives is the most it prunes
    assert m["stop_reason"] == "schedule finished before the macs budget was met" and m["macs_reduction"] < 3
