"""The output says which searched keys mattered per objective and names the ones that moved nothing."""
import json

import pytest
import yaml
from click.testing import CliRunner

from compress.cli import cli
from compress.search.explain import importances, moved, wasted

optuna = pytest.importorskip("optuna")


def _row(fidelity="full", **params_and_values):
    params = {k: v for k, v in params_and_values.items() if k.startswith("stages")}
    values = {k: v for k, v in params_and_values.items() if not k.startswith("stages")}
    return {"fidelity": fidelity, "params": params, **values}


W, S = "stages.1.w", "stages.2.s"


def test_a_key_is_credited_only_with_what_changed_while_the_other_categorical_keys_stayed():
    rows = [_row(**{W: 8, S: 0.1}, size=100, accuracy=0.90), _row(**{W: 8, S: 0.5}, size=100, accuracy=0.85),
            _row(**{W: 16, S: 0.3}, size=200, accuracy=0.93)]
    table = moved(rows, {W: [8, 16], S: {"low": 0, "high": 1}}, ["accuracy", "size"])
    assert table[S] == {"accuracy": True, "size": False}  # at width 8: sparsity changed accuracy, not the file
    assert table[W] == {"accuracy": True, "size": True}
    assert wasted(table) == []
    rows[1]["accuracy"] = 0.90
    assert wasted(moved(rows, {W: [8, 16], S: {"low": 0, "high": 1}}, ["accuracy", "size"])) == [S]
    # never varied with the width fixed: no evidence, not wasted
    assert moved(rows[1:], {W: [8, 16], S: {"low": 0, "high": 1}}, ["size"])[S] == {"size": None}
    # latency is a noisy median: 5% apart is not a move
    lat = [_row(**{W: 8, S: 0.1}, latency=1.00), _row(**{W: 8, S: 0.9}, latency=1.05)]
    assert moved(lat, {W: [8], S: {"low": 0, "high": 1}}, ["latency"])[S] == {"latency": False}


def test_importances_say_why_when_there_are_too_few_trials_or_nothing_changed():
    study = optuna.create_study(directions=["maximize", "minimize"])
    dist = {"x": optuna.distributions.FloatDistribution(0, 1), "c": optuna.distributions.CategoricalDistribution(["8", "16"])}
    add = lambda x, c, acc, size: study.add_trial(optuna.trial.create_trial(  # noqa: E731
        params={"x": x, "c": c}, distributions=dist, values=[acc, size]))
    add(0.1, "8", 0.9, 100.0)
    add(0.7, "16", 0.8, 200.0)
    got = importances(optuna, study, ["accuracy", "size"], seed=0)
    assert got == {"accuracy": "needs at least 3 full-budget trials, has 2", "size": got["accuracy"]}
    for x, c, acc, size in [(0.3, "8", 0.9, 100.0), (0.9, "16", 0.9, 200.0), (0.5, "8", 0.9, 100.0)]:
        add(x, c, acc, size)
    got = importances(optuna, study, ["accuracy", "size"], seed=0)
    assert got["size"]["c"] > got["size"]["x"]  # the width alone decides the size
    assert isinstance(got["accuracy"], dict)


def test_a_searched_key_that_moved_no_objective_is_named_in_the_cli_result_and_page(search_doc, tmp_path):
    # Magnitude pruning leaves a dense file: with size the only objective, its ratio is searched for nothing.
    search_doc["stages"][2] = {"prune": {"method": "magnitude", "sparsity": 0.3, "finetune": {"epochs": 1, "progress": False}}}
    search_doc["search"].update(objectives={"size": "min"}, trials=4, sampler="random", fidelity={"enabled": False})
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(search_doc))
    res = CliRunner().invoke(cli, ["search", str(recipe), "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    # 4 trials over 2 widths: some width was tried at two sparsities (pigeonhole), so the evidence is there
    assert "wasted: stages.2.prune.sparsity moved no objective (size)" in res.output
    result = json.loads((tmp_path / "o" / "result.json").read_text())
    assert result["explain"]["wasted"] == ["stages.2.prune.sparsity"]
    assert result["explain"]["moved"]["stages.2.prune.sparsity"] == {"size": False}
    assert "size" in result["explain"]["importance"]
    page = (tmp_path / "o" / "search.html").read_text()
    assert "wasted: stages.2.prune.sparsity" in page and "What mattered" in page
