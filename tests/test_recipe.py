"""Malformed recipes: one line naming the key path, exit status 2, nothing written."""
import textwrap

import pytest
import yaml
from click.testing import CliRunner

from compress.cli import cli
from compress.errors import RecipeError, RecipeErrors
from compress.recipe import apply_override, interpolate, parse_recipe

BASE = {
    "name": "t",
    "data": {"name": "digits"},
    "model": {"name": "mlp", "hidden": [16]},
    "stages": [{"train": {"epochs": 1, "progress": False}}],
}

# (--set override, text the error line must contain)
MALFORMED = [
    ("seed=abc", "seed: expected an integer in [0, 4294967295], got 'abc'"),
    ("stagez=[]", "stagez: unknown key; did you mean 'stages'?"),
    ("data.val_fraction=1.5", "data.val_fraction: expected a number in [0, 1), got 1.5"),
    ("data.batch_size=0", "data.batch_size: expected an integer >= 1, got 0"),
    ("data.name=digitz", "data.name: unknown dataset 'digitz'"),
    ("data.root=/x", "data.root: unknown key"),
    ("data={name: mnist, root: /no/such/folder}", "data.root: expected a folder"),
    ("model.name=mlpp", "model.name: unknown model 'mlpp'"),
    ("model.hidden=wide", "model.hidden: expected a list"),
    ("model.dropout=1", "model.dropout: expected a number in [0, 1), got 1"),
    ("model.checkpoint=/no/such.pt", "model.checkpoint: expected an existing checkpoint file"),
    ("model={import: 'no_such_module:factory'}", "model.import: cannot import"),
    ("model={name: lenet5, width: -1}", "model.width: expected a number in (0, 256], got -1"),
    ("stages=[]", "stages: expected at least 1 item"),
    ("stages=[{trian: {}}]", "stages[0]: unknown stage 'trian'"),
    ("stages=[{train: {}, evaluate: {}}]", "stages[0]: expected one stage name"),
    ("stages.0.train.epochs=-1", "stages[0].train.epochs: expected an integer >= 0, got -1"),
    ("stages.0.train.epochs=many", "stages[0].train.epochs: expected an integer >= 0, got 'many'"),
    ("stages.0.train.epoch=3", "stages[0].train.epoch: unknown key; did you mean 'epochs'?"),
    ("stages.0.train.optimizer.name=adan", "stages[0].train.optimizer.name: expected one of 'sgd', 'adam', 'adamw', 'lbfgs', got 'adan'"),
    ("stages.0.train.optimizer.lr=0", "stages[0].train.optimizer.lr: expected a number > 0, got 0"),
    ("stages.0.train.scheduler.gamma=2", "stages[0].train.scheduler.gamma: expected a number in (0, 1], got 2"),
    ("stages.0.train.grad_clip=-1", "stages[0].train.grad_clip: expected a number > 0"),
    ("stages.0.train.target=teacher", "stages[0].train.target: is 'teacher' but the recipe has no 'teacher:' section"),
    ("stages.0.train.model={name: mlp, hiden: [3]}", "stages[0].train.model.hiden: unknown key; did you mean 'hidden'?"),
    ("stages.5.train.epochs=1", "--set stages.5.train.epochs: stages is a list of 1"),
    ("name=a b", "name: expected a string matching"),
    ("data.root=${COMPRESS_TEST_UNSET_VARIABLE}", "data.root: environment variable COMPRESS_TEST_UNSET_VARIABLE is not set"),
    ("teacher={import: 'torch.nn:Linear', kwargs: {in_features: 8, out_features: 3}}",
     "teacher: expected outputs of shape (batch, 10)"),
    ("model={import: 'torch.nn:Linear', kwargs: {in_features: 5, out_features: 10}}",
     "model: the model does not accept the data's inputs of shape (1, 8, 8)"),
]


@pytest.fixture
def base_file(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(BASE))
    return path


@pytest.mark.parametrize("override,expected", MALFORMED, ids=[m[0].split("=")[0] + f"#{i}" for i, m in enumerate(MALFORMED)])
def test_malformed_recipe_is_one_line_exit_2_nothing_written(base_file, tmp_path, override, expected):
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["run", str(base_file), "--set", override, "--out", str(out)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert expected in lines[0]
    assert "Traceback" not in result.output
    assert not out.exists()


@pytest.mark.parametrize("text,expected", [
    ("name: t\nstages: [\n", "not valid YAML at line"),
    ("- just\n- a list\n", "expected a mapping of recipe keys"),
    ("name: t\ndata: !!python/object/apply:os.system ['echo hi']\n", "not valid YAML"),
])
def test_unparseable_files(tmp_path, text, expected):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    result = CliRunner().invoke(cli, ["validate", str(path)])
    assert result.exit_code == 2
    assert expected in result.stderr


def test_missing_recipe_file(tmp_path):
    result = CliRunner().invoke(cli, ["validate", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2
    assert "no such recipe file" in result.stderr


def test_validate_ok(base_file):
    result = CliRunner().invoke(cli, ["validate", str(base_file)])
    assert result.exit_code == 0, result.output
    assert "ok: t: classification on digits" in result.output


def test_several_errors_reported_one_per_line():
    doc = {**BASE, "model": {"name": "mlp", "dropout": 2}, "data": {"name": "digits", "batch_size": -1}}
    with pytest.raises(RecipeErrors) as exc:
        parse_recipe(doc)
    paths = [e.path for e in exc.value.errors]
    assert paths == ["data.batch_size", "model.dropout"]


def test_parsed_once_into_typed_objects():
    from compress.stages.train import TrainStageConfig

    r = parse_recipe(BASE, ["stages.0.train.optimizer.lr=0.01"])
    assert isinstance(r.stages[0].config, TrainStageConfig)
    assert r.stages[0].config.optimizer.lr == 0.01
    assert r.model.hidden == [16]
    assert r.stages[0].path == "stages[0].train"


def test_interpolation_defaults_and_types():
    env = {"ROOT": "/data", "EMPTY": ""}
    doc = {"a": "${ROOT}/mnist", "b": "${EPOCHS:-3}", "c": ["${EMPTY:-x}"], "d": "plain $HOME"}
    out = interpolate(doc, env)
    assert out == {"a": "/data/mnist", "b": 3, "c": ["x"], "d": "plain $HOME"}
    with pytest.raises(RecipeError, match=r"^c\[0\]: environment variable NOPE"):
        interpolate({"c": ["${NOPE}"]}, env)


def test_override_paths():
    doc = {"stages": [{"train": {"epochs": 5}}], "data": {"name": "digits"}}
    apply_override(doc, "stages.0.train.epochs=1")
    apply_override(doc, "data.batch_size=8")
    apply_override(doc, "benchmark.split=val")
    assert doc["stages"][0]["train"]["epochs"] == 1
    assert doc["data"]["batch_size"] == 8 and doc["benchmark"] == {"split": "val"}
    with pytest.raises(RecipeError, match="expected KEY.PATH=VALUE"):
        apply_override(doc, "no-equals-sign")


def test_shipped_recipes_parse(monkeypatch, tmp_path):
    """Every recipe in recipes/ passes schema validation (data folders are faked)."""
    from pathlib import Path

    from compress.recipe import load_recipe

    (tmp_path / "mnist-t10k").mkdir()
    (tmp_path / "ml-100k").mkdir()
    monkeypatch.setenv("COMPRESS_DATA_DIR", str(tmp_path))
    recipes = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
    assert recipes
    for path in recipes:
        text = path.read_text()
        if "data.root" in text and "${" not in text:
            continue
        try:
            load_recipe(path)
        except RecipeErrors as exc:  # only missing data files are acceptable here
            assert all("root" in e.path or "path" in e.path for e in exc.errors), f"{path.name}: {exc}"
        except RecipeError as exc:
            assert "root" in exc.path or "path" in exc.path, f"{path.name}: {exc}"
