import pytest
from click.testing import CliRunner

from compress.cli import cli
from compress.errors import RecipeError, RecipeErrors
from compress.recipe import parse_recipe
from compress.search.config import parse_duration, parse_search, trial_doc, strip_search
import yaml


def dumps(doc) -> str:
    return yaml.safe_dump(doc, sort_keys=False)


def _errors(doc) -> list[str]:
    with pytest.raises((RecipeError, RecipeErrors)) as e:
        parse_search(doc)
    return str(e.value).splitlines()


def test_valid_space_parses(search_doc):
    cfg = parse_search(search_doc)
    assert cfg.trials == 4 and list(cfg.objectives) == ["accuracy", "size"]


def test_run_accepts_a_recipe_with_a_search_section(search_doc):
    assert len(parse_recipe(search_doc).stages) == 3


def test_unknown_key_path_is_one_line(search_doc):
    search_doc["search"]["space"]["stages.2.prune.spars"] = [0.1]
    (line,) = _errors(search_doc)
    assert line.startswith("search.space.stages.2.prune.spars:") and "no key 'spars'" in line


def test_value_the_stage_rejects_is_one_line(search_doc):
    search_doc["search"]["space"]["stages.2.prune.sparsity"] = {"low": 0.2, "high": 1.5}
    (line,) = _errors(search_doc)
    assert line.startswith("search.space.stages.2.prune.sparsity:") and "1.5" in line and "sparsity" in line


def test_bad_space_entry_and_objective(search_doc):
    search_doc["search"]["space"]["stages.2.prune.sparsity"] = 0.3
    assert "expected a list of choices" in _errors(search_doc)[0]
    search_doc["search"]["objectives"] = {"acuracy": "max"}
    assert _errors(search_doc)[0].startswith("search.objectives")


def test_none_drops_the_stage(search_doc):
    doc = trial_doc(strip_search(search_doc), {"stages.2.prune.method": "none"})
    assert [next(iter(s)) for s in doc["stages"]] == ["train", "distill"]


def test_durations():
    assert parse_duration("45m") == 2700 and parse_duration("90s") == 90 and parse_duration(12) == 12
    with pytest.raises(ValueError):
        parse_duration("soon")


def test_cli_refuses_a_bad_space_before_training(search_doc, tmp_path):
    search_doc["search"]["space"]["stages.9.prune.sparsity"] = [0.1]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(dumps(search_doc))
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["search", str(recipe), "--out", str(out)])
    assert res.exit_code == 2, res.output
    assert "search.space.stages.9.prune.sparsity:" in res.output and "Traceback" not in res.output
    assert not out.exists()


def test_missing_optuna_is_one_line(search_doc, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna -> ImportError
    recipe = tmp_path / "r.yaml"
    recipe.write_text(dumps(search_doc))
    res = CliRunner().invoke(cli, ["search", str(recipe), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2
    assert res.output.strip().count("\n") == 0 and "pip install compress[search]" in res.output


def test_mnist_search_recipe_is_valid(tmp_path, monkeypatch):
    from pathlib import Path

    from compress.recipe import read_yaml

    monkeypatch.setenv("COMPRESS_DATA_DIR", str(tmp_path))
    (tmp_path / "mnist-t10k").mkdir()
    cfg = parse_search(read_yaml(Path(__file__).resolve().parents[2] / "recipes" / "mnist_search.yaml"))
    assert cfg.trials == 40 and cfg.constraints.speedup == 10 and cfg.constraints.max_drop == 0.005


@pytest.mark.parametrize("key, value, path", [
    ("objectives", 3, "search.objectives"),
    ("trials", float("nan"), "search.trials"),
    ("bogus", 1, "search.bogus"),
    ("time_limit", float("nan"), "search.time_limit"),
    ("time_limit", [1], "search.time_limit"),
    ("space", {"stages.2.prune.sparsity": "0.3"}, "search.space.stages.2.prune.sparsity"),
    ("space", {"stages.9.prune.sparsity": [0.3]}, "search.space.stages.9.prune.sparsity"),
])
def test_validate_checks_the_search_section(search_doc, tmp_path, key, value, path):
    search_doc["search"][key] = value
    recipe = tmp_path / "r.yaml"
    recipe.write_text(dumps(search_doc))
    res = CliRunner().invoke(cli, ["validate", str(recipe)])
    assert res.exit_code == 2, res.output
    assert res.output.startswith(f"error: {path}") and "Traceback" not in res.output, res.output


def test_validate_checks_a_search_section_that_is_not_a_mapping(search_doc, tmp_path):
    search_doc["search"] = ["space"]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(dumps(search_doc))
    res = CliRunner().invoke(cli, ["validate", str(recipe)])
    assert res.exit_code == 2 and res.output.startswith("error: search"), res.output
