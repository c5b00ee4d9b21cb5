import json

import pytest
import yaml
from click.testing import CliRunner

from compress.cli import cli
from compress.search.engine import Search, search

pytest.importorskip("optuna")


def _front(res):
    return sorted((json.dumps(r["params"], sort_keys=True), round(r["accuracy"], 6), r["size"]) for r in res.front)


def test_search_reuses_stages_and_resumes_after_a_kill(search_doc, tmp_path, monkeypatch):
    whole = search(search_doc, out=tmp_path / "whole", log=lambda *_: None)
    rows = [json.loads(line) for line in (tmp_path / "whole" / "trials.jsonl").read_text().splitlines()]
    assert {r["trial"] for r in rows} == {0, 1, 2, 3} and rows == whole.rows
    assert whole.reuse["stage_runs"]["0:train"] == 1  # the teacher trains once for the baseline and all trials
    assert whole.reuse["hits"] >= 8 and whole.reuse["saved_seconds"] > 0
    assert whole.front and whole.chosen is not None and whole.test["split"] == "test"
    assert (tmp_path / "whole" / "chosen" / "recipe.yaml").is_file() and (tmp_path / "whole" / "search.html").is_file()

    # Kill during trial 2 (its trial stays RUNNING in the study), then resume: same front as uninterrupted.
    real, calls = Search.run_one, []

    def dying(self, params, fidelity, number):
        calls.append(number)
        if number == 2:
            raise KeyboardInterrupt
        return real(self, params, fidelity, number)

    monkeypatch.setattr(Search, "run_one", dying)
    with pytest.raises(KeyboardInterrupt):
        search(search_doc, out=tmp_path / "killed", log=lambda *_: None)
    monkeypatch.setattr(Search, "run_one", real)
    with pytest.raises(Exception, match="--resume"):
        search(search_doc, out=tmp_path / "killed", log=lambda *_: None)
    resumed = search(search_doc, out=tmp_path / "killed", resume=True, log=lambda *_: None)
    assert {r["trial"] for r in resumed.rows} == {0, 1, 3, 4}  # trial 2 died; its rerun is trial 3's number on
    assert _front(resumed) == _front(whole)
    assert resumed.chosen["params"] == whole.chosen["params"]


def test_unmeetable_constraints_keep_the_closest_and_exit_0(search_doc, tmp_path):
    search_doc["search"].update(trials=2, constraints={"max_drop": 0.0, "max_size": 1})
    search_doc["search"]["fidelity"] = {"enabled": False}
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(search_doc))
    res = CliRunner().invoke(cli, ["search", str(recipe), "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    assert "no trial meets the constraints" in res.output and "max_size by" in res.output
    assert (tmp_path / "o" / "chosen" / "closest_0" / "recipe.yaml").is_file()
    result = json.loads((tmp_path / "o" / "result.json").read_text())
    assert result["chosen"] is None and result["closest"][0]["misses"]["max_size"] > 0
