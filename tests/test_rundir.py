"""Run directories: --force deletes only compress's own run folders, one live run per folder, safe resumes."""
import json
import threading

import pytest

from compress.errors import CompressError, RecipeErrors
from compress.pipeline import Pipeline
from compress.rundir import (LOCK, MARKER, RunLock, check_inside, check_output_file, check_run_name, is_inside,
                             open_run_dir)


@pytest.fixture
def quick(tiny_recipe):
    tiny_recipe["stages"] = [{"train": {"epochs": 1, "progress": False}}, {"evaluate": {}}]
    return tiny_recipe


@pytest.mark.parametrize("name", ["..", ".", ".hidden", "a/b", "a\\b", "", "x" * 65])
def test_run_names_are_plain(name):
    with pytest.raises(ValueError, match="expected a plain run name"):
        check_run_name(name)
    assert check_run_name("tiny-v1.2_x") == "tiny-v1.2_x"


@pytest.mark.parametrize("name", ["..", "."])
def test_force_with_a_dotted_name_deletes_nothing(tmp_path, quick, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    Pipeline.from_dict(quick).run()
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(RecipeErrors, match="name: expected a plain run name"):
        Pipeline.from_dict({**quick, "name": name}).run(force=True)
    assert (tmp_path / "keep.txt").is_file() and (tmp_path / "runs/tiny/report.json").is_file()


def test_force_never_deletes_a_folder_compress_did_not_make(tmp_path, quick, monkeypatch):
    monkeypatch.chdir(tmp_path)
    other = tmp_path / "photos"
    other.mkdir()
    (other / "a.jpg").write_text("x")
    with pytest.raises(CompressError, match="only a run directory made by compress"):
        Pipeline.from_dict({**quick, "output": {"dir": str(other)}}).run(force=True)
    with pytest.raises(CompressError, match="only a run directory made by compress"):
        Pipeline.from_dict(quick).run(other, force=True)
    assert (other / "a.jpg").is_file()
    # A run directory made by compress, but outside runs/ and named only by the recipe: kept too.
    made = tmp_path / "elsewhere"
    Pipeline.from_dict(quick).run(made)
    with pytest.raises(CompressError, match="only under runs/"):
        Pipeline.from_dict({**quick, "output": {"dir": str(made)}}).run(force=True)
    assert (made / "report.json").is_file()
    # Named on the command line (--out), or under runs/, it is replaced.
    (made / "extra.txt").write_text("x")
    Pipeline.from_dict(quick).run(made, force=True)
    assert not (made / "extra.txt").exists() and (made / MARKER).is_file()
    Pipeline.from_dict(quick).run()
    (tmp_path / "runs/tiny/extra.txt").write_text("x")
    Pipeline.from_dict(quick).run(force=True)
    assert not (tmp_path / "runs/tiny/extra.txt").exists() and (tmp_path / "runs/tiny/report.json").is_file()


def test_output_files_outside_the_run_follow_the_same_rule(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    notes = tmp_path / "notes.txt"
    notes.write_text("x")
    onnx = tmp_path / "model.onnx"
    onnx.write_text("x")
    check_output_file(tmp_path / "new.onnx", "stages[1].export.path", run, force=False, resume=False)
    check_output_file(run / "model.onnx", "stages[1].export.path", run, force=False, resume=False)
    with pytest.raises(CompressError, match=r"stages\[1\].export.path: .*model.onnx exists; use --force"):
        check_output_file(onnx, "stages[1].export.path", run, force=False, resume=False)
    check_output_file(onnx, "stages[1].export.path", run, force=True, resume=False)
    with pytest.raises(CompressError, match="not an .onnx file"):
        check_output_file(notes, "stages[1].export.path", run, force=True, resume=False)


def test_export_path_is_checked_before_anything_is_written(tmp_path, quick):
    target = tmp_path / "earlier.onnx"
    target.write_text("an earlier run's export")
    quick["stages"].append({"export": {"path": str(target)}})
    with pytest.raises(CompressError, match=r"stages\[2\].export.path: .* exists; use --force"):
        Pipeline.from_dict(quick).run(tmp_path / "run")
    assert target.read_text() == "an earlier run's export" and not (tmp_path / "run").exists()


@pytest.mark.parametrize("inside", [False, True])
def test_an_output_path_that_is_a_link_is_refused_even_with_force(tmp_path, quick, inside):
    """``deploy/model.onnx`` -> a text file: the writers would follow the link (or, inside the run
    directory, out of it); the link's name is not what decides."""
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    out = tmp_path / "run"
    if inside:  # an earlier run directory, handed over with a link planted in it
        Pipeline.from_dict(quick).run(out)
        link = out / "deploy.onnx"
    else:
        link = tmp_path / "deploy" / "model.onnx"
        link.parent.mkdir()
    link.symlink_to(notes)
    quick["stages"].append({"export": {"path": str(link)}})
    with pytest.raises(CompressError, match=r"stages\[2\].export.path: .* is a symbolic link \(to .*notes.txt\)"):
        Pipeline.from_dict(quick).run(out, force=True)
    assert notes.read_text() == "mine"


def test_lock_is_exclusive_and_a_stale_one_is_taken_over(tmp_path):
    (tmp_path / LOCK).write_text("999999999\n")  # left by a killed run: nobody holds it
    with RunLock(tmp_path) as a:
        assert a.acquire()
        b = RunLock(tmp_path)
        assert not b.acquire()
        assert b.holder() == f"pid {__import__('os').getpid()}"
    assert b.acquire()
    b.release()


def test_a_live_run_directory_refuses_a_second_run_force_and_resume(tmp_path, quick):
    out = tmp_path / "run"
    Pipeline.from_dict(quick).run(out)
    before = (out / "report.json").read_bytes()
    live = RunLock(out)
    assert live.acquire()  # as a run in another process would hold it
    try:
        for kw in ({"resume": True}, {"force": True}):
            with pytest.raises(CompressError, match="in use by a running compress"):
                Pipeline.from_dict(quick).run(out, **kw)
        empty = tmp_path / "empty"
        empty.mkdir()
        other = RunLock(empty)
        assert other.acquire()
        with pytest.raises(CompressError, match="in use by a running compress"):
            Pipeline.from_dict(quick).run(empty)
        other.release()
    finally:
        live.release()
    assert (out / "report.json").read_bytes() == before


def test_two_runs_started_together_the_second_fails_cleanly(tmp_path, quick):
    out = tmp_path / "run"
    barrier = threading.Barrier(2)
    results: list = []

    def go():
        barrier.wait()
        try:
            results.append(Pipeline.from_dict(quick).run(out))
        except CompressError as exc:
            results.append(exc)

    threads = [threading.Thread(target=go) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    reports = [r for r in results if isinstance(r, dict)]
    errors = [r for r in results if isinstance(r, CompressError)]
    assert len(reports) == 1 and len(errors) == 1, results
    assert "in use by a running compress" in str(errors[0]) or "run directory exists" in str(errors[0])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows if "epoch" in r] == [1]  # one run's rows, not two interleaved


def test_default_directories_of_concurrent_runs_differ(tmp_path, quick, monkeypatch):
    monkeypatch.chdir(tmp_path)
    held = RunLock(tmp_path / "runs/tiny")
    (tmp_path / "runs/tiny").mkdir(parents=True)
    assert held.acquire()  # a run that has just claimed runs/tiny
    try:
        assert Pipeline.from_dict(quick).run()["run_dir"] == "runs/tiny-2"
    finally:
        held.release()


def test_resume_reruns_a_stage_whose_checkpoint_is_empty(tmp_path, quick, capsys):
    out = tmp_path / "run"
    full = Pipeline.from_dict(quick).run(out)
    (out / "stages/00_train/model.pt").write_bytes(b"")
    (out / "stages/00_train/.model.pt.abc123.tmp").write_bytes(b"half")  # a write a kill cut short
    resumed = Pipeline.from_dict(quick).run(out, resume=True)
    said = capsys.readouterr().out
    assert "cannot resume from" in said and "model.pt: not a loadable checkpoint (the file is empty)" in said
    assert [r["metrics"] for r in resumed["stages"]] == [r["metrics"] for r in full["stages"]]
    assert not list(out.rglob("*.tmp"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows if r.get("stage") == "train:model"] == [1]
    assert [r["index"] for r in rows if r.get("event") == "stage_done"] == [0, 1]


def test_resume_logs_no_epoch_twice(tmp_path, tiny_recipe, monkeypatch):
    """Killed after epoch 2's row was logged but before its state was saved: epoch 2 is logged once."""
    import compress.checkpoint

    tiny_recipe["stages"] = [{"train": {"epochs": 3, "progress": False, "save_every_epoch": True}}]
    out = tmp_path / "run"
    original = compress.checkpoint.save_model

    def killed_at_epoch_2(model, path, meta=None):
        if path.name == "epoch002.pt":
            raise KeyboardInterrupt
        return original(model, path, meta)

    monkeypatch.setattr(compress.checkpoint, "save_model", killed_at_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        Pipeline.from_dict(tiny_recipe).run(out)
    monkeypatch.setattr(compress.checkpoint, "save_model", original)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"stage": "train:mo')  # a line the kill cut short
    Pipeline.from_dict(tiny_recipe).run(out, resume=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows if r.get("stage") == "train:model"] == [1, 2, 3]


def test_is_inside_follows_links_and_check_inside_refuses_in_one_line(tmp_path):
    run, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    run.mkdir()
    elsewhere.mkdir()
    (run / "out").symlink_to(elsewhere)
    (run / "loop").symlink_to(run / "loop")
    assert is_inside(run, run / "a" / "b.pt") and not is_inside(run, run)
    for path in (run / "out" / "b.pt", run / ".." / "elsewhere", run / "loop"):
        assert not is_inside(run, path)
    with pytest.raises(CompressError, match=r"^row\.file: .* resolves outside") as e:
        check_inside(run, run / "out" / "b.pt", "row.file")
    assert "\n" not in str(e.value)


def test_resume_needs_the_file_the_command_saved(tmp_path):
    d = tmp_path / "s"
    d.mkdir()
    (d / "recipe.yaml").write_text("name: x\n")
    with pytest.raises(CompressError, match="no search.yaml"):
        open_run_dir(d, d, "x", resume=True, saved="search.yaml")
    (d / "search.yaml").write_text("name: x\n")
    got, lock = open_run_dir(d, d, "x", resume=True, saved="search.yaml")
    lock.release()
    assert got == d
