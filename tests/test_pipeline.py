"""The run directory, resume, and the end-to-end CLI."""
import json

import pytest
import yaml
from click.testing import CliRunner

from compress.checkpoint import load_model
from compress.cli import cli
from compress.errors import CompressError
from compress.pipeline import Pipeline
from compress.stages.base import STAGES
from compress.trainer import Hook, Trainer


def test_cli_run_end_to_end(tmp_path, tiny_recipe):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe))
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["run", str(path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "| 0: train |" in result.output
    report = json.loads((out / "report.json").read_text())
    assert report["recipe"] == "tiny"
    assert [s["name"] for s in report["stages"]] == ["train", "evaluate"]
    row = report["stages"][0]
    assert 0.5 < row["metrics"]["accuracy"] <= 1.0  # 3 well-separated classes: chance is 0.33
    assert row["params"] == row["nonzero_params"] == 36 * 16 + 16 + 16 * 3 + 3
    assert row["size_bytes"] == (out / "stages/00_train/model.pt").stat().st_size
    assert (out / "recipe.yaml").is_file()
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines if r.get("stage") == "train:model" and "epoch" in r] == [1, 2]


def test_existing_run_directory_is_never_overwritten(tmp_path, tiny_recipe):
    out = tmp_path / "run"
    Pipeline.from_dict(tiny_recipe).run(out)
    before = (out / "report.json").read_bytes()
    with pytest.raises(CompressError, match="run directory exists"):
        Pipeline.from_dict(tiny_recipe).run(out)
    assert (out / "report.json").read_bytes() == before
    # A bad recipe with --force still writes nothing: validation comes first.
    bad = {**tiny_recipe, "model": {"name": "mlp", "hidden": "x"}}
    with pytest.raises(CompressError):
        Pipeline.from_dict(bad).run(out, force=True)
    assert (out / "report.json").read_bytes() == before


def test_default_directory_is_made_unique(tmp_path, tiny_recipe, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a = Pipeline.from_dict(tiny_recipe).run()["run_dir"]
    b = Pipeline.from_dict(tiny_recipe).run()["run_dir"]
    assert a != b and b.endswith("tiny-2")


def _metrics(report):
    return [r["metrics"] for r in report["stages"]]


def test_resume_after_first_stage_matches_uninterrupted(tmp_path, tiny_recipe, monkeypatch):
    tiny_recipe["stages"] = [{"train": {"epochs": 2, "progress": False}},
                             {"train": {"epochs": 2, "progress": False, "optimizer": {"lr": 0.01}}}]
    full = Pipeline.from_dict(tiny_recipe).run(tmp_path / "full")

    entry = STAGES.get("train")
    original = entry.obj
    calls = {"n": 0}

    def dies_on_second_stage(state, cfg):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(state, cfg)

    monkeypatch.setattr(entry, "obj", dies_on_second_stage)
    with pytest.raises(KeyboardInterrupt):
        Pipeline.from_dict(tiny_recipe).run(tmp_path / "cut")
    monkeypatch.setattr(entry, "obj", original)
    assert not (tmp_path / "cut/stages/01_train/done.json").exists()
    resumed = Pipeline.from_dict(tiny_recipe).run(tmp_path / "cut", resume=True)
    assert _metrics(resumed) == _metrics(full)


class _StopAtEpoch(Hook):
    def __init__(self, epoch):
        self.epoch = epoch

    def on_epoch_start(self, trainer, epoch):
        if epoch == self.epoch:
            raise KeyboardInterrupt


def test_resume_inside_a_stage_continues_at_the_last_epoch(tmp_path, tiny_recipe, monkeypatch):
    tiny_recipe["stages"] = [{"train": {"epochs": 4, "progress": False}}]
    full = Pipeline.from_dict(tiny_recipe).run(tmp_path / "full")

    original_init = Trainer.__init__

    def init_with_stop(self, *a, **kw):
        original_init(self, *a, **kw)
        self.hooks.append(_StopAtEpoch(2))

    monkeypatch.setattr(Trainer, "__init__", init_with_stop)
    with pytest.raises(KeyboardInterrupt):
        Pipeline.from_dict(tiny_recipe).run(tmp_path / "cut")
    monkeypatch.setattr(Trainer, "__init__", original_init)
    assert (tmp_path / "cut/stages/00_train/trainer_state.pt").is_file()
    resumed = Pipeline.from_dict(tiny_recipe).run(tmp_path / "cut", resume=True)
    assert _metrics(resumed) == _metrics(full)
    epochs = [json.loads(line).get("epoch") for line in (tmp_path / "cut/metrics.jsonl").read_text().splitlines()]
    assert epochs.count(3) == 1 and epochs.count(1) == 1  # epochs 1-2 were not trained again


def test_resume_refuses_a_changed_recipe(tmp_path, tiny_recipe):
    Pipeline.from_dict(tiny_recipe).run(tmp_path / "run")
    with pytest.raises(CompressError, match="differs from the recipe of the run being resumed"):
        Pipeline.from_dict(tiny_recipe, ["seed=5"]).run(tmp_path / "run", resume=True)


def test_stage_checkpoint_reloads_with_same_metrics(tmp_path, tiny_recipe):
    report = Pipeline.from_dict(tiny_recipe).run(tmp_path / "run")
    from compress.data import create_data
    from compress.trainer import evaluate

    model = load_model(tmp_path / "run/stages/00_train/model.pt")
    data = create_data(tiny_recipe["data"])
    assert evaluate(model, data, "test") == report["stages"][0]["metrics"]


def test_list_command():
    result = CliRunner().invoke(cli, ["list"])
    assert result.exit_code == 0
    for name in ("train", "evaluate", "mlp", "lenet5", "smallcnn", "digits", "mnist", "synthetic"):
        assert f"  {name}" in result.output


def test_help_names_every_command():
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    for cmd in ("run", "validate", "list"):
        assert cmd in result.output


def test_run_until_and_advance_run_the_first_stages_with_the_same_seeds(tmp_path, tiny_recipe):
    tiny_recipe["stages"] = [{"train": {"epochs": 1, "progress": False}},
                             {"train": {"epochs": 1, "progress": False, "optimizer": {"lr": 0.01}}}]
    full = Pipeline.from_dict(tiny_recipe).run(tmp_path / "full")
    part = Pipeline.from_dict(tiny_recipe).run(tmp_path / "part", until=1)
    assert len(part["stages"]) == 1 and _metrics(part) == _metrics(full)[:1]
    assert not (tmp_path / "part/stages/01_train").exists()
    p = Pipeline.from_dict(tiny_recipe)
    state = p.advance(p.validate(), 1)  # in memory: nothing written
    from compress import evaluate

    assert evaluate(state.model, state.data, "test") == pytest.approx(full["stages"][0]["metrics"])
