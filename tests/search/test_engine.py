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
    assert whole.reuse["hits"] >= 4 and whole.reuse["saved_seconds"] > 0  # every trial reuses the teacher at least
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


# -- the search directory follows compress run's rules; its study database is input ----------------------
def _cli(*args):
    return CliRunner().invoke(cli, ["search", *map(str, args)])


def _one_line_refusal(res, *needles):
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and res.output.strip().count("\n") == 0, res.output
    for n in needles:
        assert n in res.output, res.output


def _quick(doc, tmp_path):
    doc["search"].update(trials=1, fidelity={"enabled": False})
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(doc, sort_keys=False))
    return recipe


def test_a_folder_compress_did_not_make_is_refused_and_untouched(search_doc, tmp_path):
    recipe = _quick(search_doc, tmp_path)
    mine = tmp_path / "my_project"
    files = {"chosen/model.pt": b"mine", "trials/0000/full/notes.txt": b"keep me", "notes.txt": b"hello"}
    for name, data in files.items():
        (mine / name).parent.mkdir(parents=True, exist_ok=True)
        (mine / name).write_bytes(data)
    _one_line_refusal(_cli(recipe, "--out", mine), "--resume", "--force")
    _one_line_refusal(_cli(recipe, "--out", mine, "--force"), ".compress-run", "nothing was deleted")
    for name, data in files.items():
        assert (mine / name).read_bytes() == data
    assert sorted(p.name for p in mine.iterdir()) == ["chosen", "notes.txt", "trials"]


def test_a_live_search_directory_refuses_a_second_search_and_resume(search_doc, tmp_path, one_trial_db):
    from compress.errors import CompressError
    from compress.rundir import RunLock

    search_doc["search"].update(trials=1, fidelity={"enabled": False})
    live = _study(tmp_path / "live", search_doc, [], one_trial_db)
    lock = RunLock(live)
    assert lock.acquire()  # as a search in another process holds it
    try:
        for kw in ({"resume": True}, {"force": True}):
            with pytest.raises(CompressError, match="in use by a running compress"):
                search(search_doc, out=live, log=lambda *_: None, **kw)
        empty = tmp_path / "empty"
        empty.mkdir()
        with RunLock(empty) as other:
            assert other.acquire()
            with pytest.raises(CompressError, match="in use by a running compress"):
                search(search_doc, out=empty, log=lambda *_: None)
    finally:
        lock.release()
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == [".compress.lock"]


def _row(**kw):
    return {"trial": 0, "fidelity": "full", "params": {}, "accuracy": 0.9, "size": 100, "n_params": 10,
            "macs": None, "file": "model.pt", "seconds": 1.0, "dir": ".", "misses": {}, "feasible": True, **kw}


@pytest.fixture(scope="module")
def one_trial_db(tmp_path_factory):
    """A study.db holding one finished trial (made once: creating an Optuna database takes a while)."""
    import optuna

    db = tmp_path_factory.mktemp("db") / "study.db"
    study = optuna.create_study(storage=f"sqlite:///{db}", study_name="search", directions=["maximize", "minimize"])
    study.add_trial(optuna.trial.create_trial(values=[0.9, 100.0], user_attrs={"rows": [], "violation": [-1.0]}))
    return db


def _study(out, doc, rows, db):
    """A search directory whose study.db (a copy of ``db``) holds one finished trial with these rows."""
    import shutil
    import sqlite3

    out.mkdir(parents=True)
    (out / ".compress-run").write_text('{"tool": "compress"}')
    (out / "search.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    shutil.copy(db, out / "study.db")
    with sqlite3.connect(out / "study.db") as con:  # a finished trial is read-only through Optuna's API
        con.execute("UPDATE trial_user_attributes SET value_json = ? WHERE key = 'rows'", (json.dumps(rows),))
    con.close()
    return out


def test_resume_refuses_database_paths_outside_the_search_directory(search_doc, tmp_path, one_trial_db):
    from compress.checkpoint import save_model
    from compress.models import create_model

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    save_model(create_model({"name": "mlp", "hidden": [16]}, (1, 8, 8), 10), outside / "secret.pt")
    (outside / "recipe.yaml").write_text(yaml.safe_dump(search_doc))
    out = tmp_path / "s"
    recipe = _quick(search_doc, tmp_path)
    inside = out / "trials" / "0000" / "full"
    for row in (_row(file=str(outside / "secret.pt"), dir=str(outside)),
                _row(file=str(inside / "link.pt"), dir=str(inside))):  # a link inside pointing out
        import shutil

        shutil.rmtree(out, ignore_errors=True)
        _study(out, yaml.safe_load(recipe.read_text()), [row], one_trial_db)
        inside.mkdir(parents=True)
        (inside / "link.pt").symlink_to(outside / "secret.pt")
        (inside / "recipe.yaml").symlink_to(outside / "recipe.yaml")
        _one_line_refusal(_cli(recipe, "--out", out, "--resume"), str(out / "study.db"), "outside")
        assert not (out / "chosen").exists()


@pytest.mark.parametrize("bad", [
    {"accuracy": "0.9"}, {"size": [1]}, {"misses": {"max_drop": "a lot"}}, {"misses": {"nope": 1}},
    {"file": 3}, {"fidelity": "medium"}, {"feasible": "yes"},
])
def test_resume_refuses_a_bad_row_in_one_line(search_doc, tmp_path, one_trial_db, bad):
    recipe = _quick(search_doc, tmp_path)
    out = _study(tmp_path / "s", yaml.safe_load(recipe.read_text()), [_row(**bad)], one_trial_db)
    _one_line_refusal(_cli(recipe, "--out", out, "--resume"), str(out / "study.db"), "trial 0")


def test_resume_refuses_a_corrupt_database_in_one_line(search_doc, tmp_path, one_trial_db):
    recipe = _quick(search_doc, tmp_path)
    out = _study(tmp_path / "s", yaml.safe_load(recipe.read_text()), [], one_trial_db)
    (out / "study.db").write_bytes(b"SQLite format 3\x00" + b"\xff" * 4000)
    _one_line_refusal(_cli(recipe, "--out", out, "--resume"), str(out / "study.db"))
    assert not (out / "chosen").exists() and not (out / "baseline").exists()


def test_resume_refuses_a_folder_of_the_search_that_links_out(search_doc, tmp_path, one_trial_db):
    recipe = _quick(search_doc, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = _study(tmp_path / "s", yaml.safe_load(recipe.read_text()), [], one_trial_db)
    (out / "trials").symlink_to(elsewhere)  # trial 1 would be written (and emptied first) over there
    _one_line_refusal(_cli(recipe, "--out", out, "--resume", "--trials", 2), "trials", "outside")
    assert list(elsewhere.iterdir()) == []


def test_a_stage_path_out_of_the_search_directory_is_not_written(search_doc):
    from compress.search.engine import own_files

    search_doc["stages"].append({"export": {"path": "deploy/model.onnx", "opset": 17}})
    said = []
    doc = own_files(search_doc, said.append)
    assert doc["stages"][3] == {"export": {"opset": 17}} and "stages.3.export.path" in said[0]


def test_saved_search_files_keep_variables_not_their_values(search_doc, tmp_path, monkeypatch):
    from compress import create_data, create_model
    from compress.checkpoint import save_model

    secret = tmp_path / "secret-weights-dir"
    data = create_data({"name": "digits"})
    save_model(create_model({"name": "mlp", "hidden": [32]}, data.input_shape, data.num_outputs), secret / "t.pt")
    monkeypatch.setenv("WEIGHTS", str(secret))
    search_doc["teacher"]["checkpoint"] = "${WEIGHTS}/t.pt"
    res = _cli(_quick(search_doc, tmp_path), "--out", tmp_path / "o")
    assert res.exit_code == 0, res.output
    files = [f for f in (tmp_path / "o").rglob("*") if f.is_file()]
    assert any(f.name == "model.pt" for f in files)
    assert not [f for f in files if b"secret-weights-dir" in f.read_bytes()]
