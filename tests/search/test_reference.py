"""The reference (the first stage's model) is trained once per search, resumes included, and is the very
teacher the trials distil from; the size objective is the file the chain ends with."""
import hashlib
from pathlib import Path

import pytest

from compress.search.engine import search

pytest.importorskip("optuna")


def _digest(model) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode() + v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def test_one_teacher_per_search_across_resume_and_the_trials_distil_from_it(search_doc, tmp_path, monkeypatch):
    import compress.pipeline as pipeline
    from compress.checkpoint import load_model

    real, first_stage_runs, teachers = pipeline.run_stage, [], set()

    def counting(state, spec):
        if spec.index == 0:
            first_stage_runs.append(spec.name)
        elif spec.name == "distill":
            teachers.add(_digest(state.teacher))
        return real(state, spec)

    monkeypatch.setattr(pipeline, "run_stage", counting)
    # The student's spec is searched too: it must not make each trial train its own teacher.
    search_doc["model"] = {"name": "mlp", "hidden": [16]}
    search_doc["stages"][1]["distill"].pop("student")
    search_doc["search"]["space"] = {"model.hidden": [[8], [16]], "stages.2.prune.sparsity": {"low": 0.1, "high": 0.6}}
    search_doc["search"]["trials"] = 2
    search(search_doc, out=tmp_path / "s", log=lambda *_: None)
    search(search_doc, out=tmp_path / "s", resume=True, trials=3, log=lambda *_: None)
    assert first_stage_runs == ["train"]  # baseline, 3 trials at two fidelities and a resume: one teacher
    assert teachers == {_digest(load_model(tmp_path / "s" / "baseline" / "model.pt"))}


def test_a_space_key_that_changes_the_reference_is_refused(search_doc):
    from compress.errors import RecipeErrors
    from compress.search.config import parse_search

    search_doc["search"]["space"] = {"stages.0.train.epochs": [1, 2], "data.batch_size": [32, 64]}
    with pytest.raises(RecipeErrors) as e:
        parse_search(search_doc)
    lines = str(e.value).splitlines()
    assert [ln.split(":")[0] for ln in lines] == ["search.space.stages.0.train.epochs", "search.space.data.batch_size"]
    assert all("first stage's model" in ln for ln in lines)


@pytest.mark.parametrize("tail, suffix", [
    ([{"encode": {}}], ".cpk"),  # packed: sparse weights cost fewer bytes
    ([{"quantize": {"method": "ptq_static", "calibration": {"batches": 2}}}], ".onnx"),  # the int8 file
    ([{"quantize": {"method": "ptq_static", "calibration": {"batches": 2}}}, {"encode": {}}], ".cpk+onnx"),  # packed int8
])
def test_the_size_objective_is_the_file_the_chain_ends_with(search_doc, tmp_path, tail, suffix):
    search_doc["stages"][2] = {"prune": {"method": "magnitude", "sparsity": 0.3, "finetune": {"epochs": 1, "progress": False}}}
    search_doc["stages"] += tail
    search_doc["search"].update(trials=2, sampler="random", seed=2, fidelity={"enabled": False},  # seed 2: both values
                                space={"stages.2.prune.sparsity": [0.2, 0.9]})
    res = search(search_doc, out=tmp_path / "s", log=lambda *_: None)
    rows = sorted(res.rows, key=lambda r: r["params"]["stages.2.prune.sparsity"])
    for r in rows:
        assert Path(r["file"]).suffix == suffix.split("+")[0] and r["size"] == Path(r["file"]).stat().st_size
        assert (Path(r.get("onnx") or "x").suffix == ".onnx") == suffix.endswith("+onnx")  # what ORT runs and times
    if suffix == ".cpk":  # the dense float file would be the same size at both sparsities
        assert len({r["params"]["stages.2.prune.sparsity"] for r in rows}) == 2 and rows[1]["size"] < rows[0]["size"]
    chosen = res.chosen or res.closest[0]
    assert res.test is not None and Path(chosen["chosen_file"]).is_file() and res.test["size"] == chosen["size"]
