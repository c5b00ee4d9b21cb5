"""Files are data: a checkpoint or recipe naming user code runs nothing without the opt-in; no secret is echoed.

The "code" here is ``os:makedirs`` with ``name: <marker>``: if a load path imports and calls what the
file names, the marker folder appears.
"""
import json

import pytest
import torch
import yaml
from click.testing import CliRunner

import compress
from compress.checkpoint import FORMAT, load_model
from compress.cli import cli
from compress.errors import CompressError, RecipeError
from compress.pipeline import Pipeline
from compress.safety import ALLOW_IMPORT_ENV, allowing_imports, import_allowed, redact


@pytest.fixture(autouse=True)
def _no_env_opt_in(monkeypatch):
    monkeypatch.delenv(ALLOW_IMPORT_ENV, raising=False)


def _crafted(tmp_path, marker):
    """A checkpoint that passes weights_only=True but whose spec would call os.makedirs(marker)."""
    path = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "spec": {"name": "import", "import": "os:makedirs", "kwargs": {"name": str(marker)}},
                "io": {"input_shape": [1, 6, 6], "num_outputs": 3}, "transforms": [], "state_dict": {}, "meta": {}}, path)
    return path


def _recipe_file(tmp_path, doc):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_opt_in_resolution(monkeypatch):
    assert not import_allowed()
    assert import_allowed(True) and not import_allowed(False)
    with allowing_imports(True):
        assert import_allowed() and not import_allowed(False)
    assert not import_allowed()
    monkeypatch.setenv(ALLOW_IMPORT_ENV, "1")
    assert import_allowed() and not import_allowed(False)


def test_crafted_checkpoint_runs_nothing_through_the_api(tmp_path, tiny_recipe):
    marker = tmp_path / "ran"
    evil = _crafted(tmp_path, marker)
    with pytest.raises(CompressError, match=r"evil.pt: its model spec imports module 'os' .*--allow-import"):
        load_model(evil)
    data = compress.create_data(tiny_recipe["data"])
    student = compress.create_model("mlp", data.input_shape, data.num_outputs, hidden=[4])
    with pytest.raises(CompressError, match="imports module 'os'"):
        compress.distill(student, evil, compress.DistillConfig(epochs=1, progress=False), data)
    assert not marker.exists()
    # The opt-in is what makes the difference: with it, the file's code does run.
    with pytest.raises(CompressError):
        load_model(evil, allow_import=True)  # os.makedirs returns None, not a model
    assert marker.is_dir()


def test_crafted_checkpoint_runs_nothing_through_the_cli(tmp_path, tiny_recipe):
    marker = tmp_path / "ran"
    evil = _crafted(tmp_path, marker)
    recipe = _recipe_file(tmp_path, tiny_recipe)
    for args in (["bench", str(evil), "--recipe", str(recipe)],
                 ["sensitivity", str(recipe), "--checkpoint", str(evil), "--out", str(tmp_path / "sens")]):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 2, result.output
        assert "imports module 'os'" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not marker.exists()


def test_resume_loads_no_crafted_checkpoint(tmp_path, tiny_recipe):
    marker = tmp_path / "ran"
    evil = _crafted(tmp_path, marker)
    tiny_recipe["stages"] = [{"train": {"epochs": 1, "progress": False}}, {"evaluate": {}}]
    out = tmp_path / "run"
    Pipeline.from_dict(tiny_recipe).run(out)
    # A done.json pointing at the file, and the file planted as a finished stage's model.
    done = out / "stages/00_train/done.json"
    done.write_text(json.dumps({**json.loads(done.read_text()), "model_file": str(evil)}))
    (out / "stages/01_evaluate/model.pt").write_bytes(evil.read_bytes())
    report = Pipeline.from_dict(tiny_recipe).run(out, resume=True)
    assert not marker.exists()
    assert report["stages"][0]["model_file"] == str(out / "stages/00_train/model.pt")
    assert len(report["stages"]) == 2  # the planted stage was run again


def test_recipe_import_needs_the_opt_in_and_validate_runs_nothing(tmp_path, tiny_recipe, monkeypatch):
    marker = tmp_path / "ran"
    spec = {"import": "os:makedirs", "kwargs": {"name": str(marker)}}
    for doc in ({**tiny_recipe, "model": spec},
                {**tiny_recipe, "stages": [{"train": {"epochs": 1, "model": spec}}]},
                # prune's check builds the model to look at layer names while the recipe is parsed
                {**tiny_recipe, "model": spec, "stages": [{"prune": {"sparsity": 0.5, "ignored_layers": ["0"]}}]}):
        recipe = _recipe_file(tmp_path, doc)
        # validate checks syntax only, even with the opt-in in the environment
        result = CliRunner().invoke(cli, ["validate", str(recipe)], env={ALLOW_IMPORT_ENV: "1"})
        assert result.exit_code == 0, result.output
        assert "'compress run' needs --allow-import" in result.output and "os:makedirs" in result.output
        result = CliRunner().invoke(cli, ["run", str(recipe), "--out", str(tmp_path / "run")])
        assert result.exit_code == 2, result.output
        assert "import: imports module 'os'" in result.stderr and "--allow-import" in result.stderr
        assert not (tmp_path / "run").exists()
        with pytest.raises(RecipeError, match="imports module 'os'"):
            Pipeline.from_dict(doc).run(tmp_path / "run")
        assert not marker.exists()
    # With the opt-in the factory is called (and returns no model: a one-line error).
    recipe = _recipe_file(tmp_path, {**tiny_recipe, "model": spec})
    monkeypatch.setenv(ALLOW_IMPORT_ENV, "1")
    result = CliRunner().invoke(cli, ["run", str(recipe), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "returned NoneType" in result.stderr, result.output
    assert marker.is_dir()


def test_a_trusted_import_model_runs_and_resumes(tmp_path, tiny_recipe, capsys):
    """The run's opt-in covers its own checkpoints: the baseline row and a resume reload them."""
    tiny_recipe["data"]["shape"] = [3]
    tiny_recipe["model"] = {"import": "torch.nn:Linear", "kwargs": {"in_features": 3, "out_features": 3}}
    tiny_recipe["stages"] = [{"train": {"epochs": 1, "progress": False}}, {"evaluate": {}}]
    out = tmp_path / "run"
    full = Pipeline.from_dict(tiny_recipe).run(out, allow_import=True)
    (out / "stages/01_evaluate/done.json").unlink()
    resumed = Pipeline.from_dict(tiny_recipe).run(out, resume=True, allow_import=True)
    assert "[train] already finished" in capsys.readouterr().out
    assert [r["metrics"] for r in resumed["stages"]] == [r["metrics"] for r in full["stages"]]
    with pytest.raises(RecipeError, match="^model.import: imports module 'torch.nn'"):
        Pipeline.from_dict(tiny_recipe).run(out, resume=True)


def test_saved_recipe_keeps_variables_and_errors_do_not_echo_values(tmp_path, tiny_recipe, monkeypatch):
    tiny_recipe["seed"] = "${SEED}"
    tiny_recipe["stages"] = [{"evaluate": {}}]
    monkeypatch.setenv("SEED", "424242")
    report = Pipeline.from_dict(tiny_recipe).run(tmp_path / "run")
    monkeypatch.delenv("SEED")
    assert report["seed"] == 424242
    saved = (tmp_path / "run/recipe.yaml").read_text()
    assert "${SEED}" in saved and "424242" not in saved
    recipe = _recipe_file(tmp_path, {**tiny_recipe, "seed": "${TOKEN}"})
    result = CliRunner().invoke(cli, ["validate", str(recipe)], env={"TOKEN": "s3cr3t-token-value"})
    assert result.exit_code == 2
    assert "s3cr3t" not in result.output and "got '${TOKEN}'" in result.stderr and result.stderr.startswith("error: seed: expected an integer")


def test_redact_longest_value_first():
    assert redact("a /data/x/y b", {"/data": "ROOT", "/data/x": "SUB"}) == "a ${SUB}/y b"


def test_saved_files_keep_variables_not_their_values(tmp_path, tiny_recipe, monkeypatch):
    """Checkpoint specs, packed headers, report.json, metrics.jsonl and done.json hold ``${VAR}``, never the
    value; a reload resolves it from the loading process's environment."""
    first = tmp_path / "secret-weights-dir"
    Pipeline.from_dict({**tiny_recipe, "stages": [{"train": {"epochs": 1, "progress": False}}]}).run(first)
    monkeypatch.setenv("WEIGHTS", str(first))
    monkeypatch.setenv("DEPLOY", str(tmp_path / "secret-deploy-dir"))
    tiny_recipe["model"] = {**tiny_recipe["model"], "checkpoint": "${WEIGHTS}/stages/00_train/model.pt"}
    tiny_recipe["stages"] = [{"evaluate": {}}, {"encode": {}}, {"export": {"path": "${DEPLOY}/m.onnx"}}]
    out = tmp_path / "run"
    Pipeline.from_dict(tiny_recipe).run(out)
    files = [f for f in out.rglob("*") if f.is_file()]
    assert {"report.json", "metrics.jsonl", "done.json", "model.pt"} <= {f.name for f in files}
    for f in files:
        data = f.read_bytes()
        assert b"secret-weights-dir" not in data and b"secret-deploy-dir" not in data, f
    assert b"${WEIGHTS}" in (out / "stages/00_evaluate/model.pt").read_bytes()
    assert "${DEPLOY}/m.onnx" in (out / "report.json").read_text()
    assert (tmp_path / "secret-deploy-dir/m.onnx").is_file()
    assert load_model(out / "stages/00_evaluate/model.pt") is not None
    packed = next(out.glob("stages/01_encode/*.cpk"))
    assert load_model(packed) is not None


def test_reload_resolves_variables_or_names_the_missing_one(tmp_path, monkeypatch):
    path = tmp_path / "m.pt"
    torch.save({"format": FORMAT, "spec": {"name": "mlp", "hidden": "${HIDDEN}"}, "io": {"input_shape": [4], "num_outputs": 2},
                "transforms": [], "state_dict": {}, "meta": {}}, path)
    monkeypatch.delenv("HIDDEN", raising=False)
    with pytest.raises(CompressError, match=r"m.pt: spec.hidden: environment variable HIDDEN is not set"):
        load_model(path)


# -- a model or tokenizer folder's own Python, and downloads (issue 24) ----------------------------------
@pytest.mark.parametrize("files,asks", [
    ({"config.json": {"model_type": "bert"}}, None),
    ({"config.json": {"auto_map": {"AutoConfig": "evil.Config"}}}, "config.json"),
    ({"tokenizer_config.json": {"auto_map": {"AutoTokenizer": [None, "evil.Tok"]}}}, "tokenizer_config.json"),
    ({"config.json": "{not json", "tokenizer_config.json": {"auto_map": {}}}, None),  # transformers reports bad JSON
], ids=["plain", "config", "tokenizer", "unreadable"])
def test_a_folder_asking_for_its_code_is_refused_unless_opted_in_and_never_while_checking(tmp_path, files, asks):
    from compress.safety import asks_for_code, checking_only, trust_remote_code

    for name, doc in files.items():
        (tmp_path / name).write_text(doc if isinstance(doc, str) else json.dumps(doc))
    assert asks_for_code(tmp_path) == asks
    if asks is None:
        assert trust_remote_code(tmp_path, "model.name") is False
    else:
        with pytest.raises(RecipeError, match=rf"^model.name: '.*' asks to run its own Python \(auto_map in {asks}\); "
                                              r"pass --allow-import"):
            trust_remote_code(tmp_path, "model.name")
    with allowing_imports(True):
        assert trust_remote_code(tmp_path, "model.name") is True
        with checking_only():
            if asks:
                with pytest.raises(RecipeError, match="never run while a recipe is only checked"):
                    trust_remote_code(tmp_path, "data.tokenizer")
            else:
                assert trust_remote_code(tmp_path, "data.tokenizer") is False


def test_downloads_are_refused_while_loading_or_checking():
    from compress.safety import checking_only, offline, offline_reason

    assert offline_reason() == ""
    with offline("while m.pt is loaded"):
        assert offline_reason() == "while m.pt is loaded"
    with checking_only():
        assert offline_reason() == "while a recipe is only checked"
    assert offline_reason() == ""


def test_a_reloaded_model_saved_again_keeps_the_variable(tmp_path, monkeypatch):
    """``load_model`` resolves ``${ACT}`` to build the model; the model keeps the spec as written, so
    packing or saving it again writes no value."""
    from compress import create_model
    from compress.checkpoint import save_model

    spec = {"name": "mlp", "hidden": [4], "activation": "${ACT}"}
    weights = create_model({**spec, "activation": "gelu"}, (4,), 2).state_dict()
    torch.save({"format": FORMAT, "spec": spec, "io": {"input_shape": [4], "num_outputs": 2}, "transforms": [],
                "state_dict": weights, "meta": {}}, tmp_path / "m.pt")
    monkeypatch.setenv("ACT", "gelu")
    save_model(load_model(tmp_path / "m.pt"), tmp_path / "again.pt")
    data = (tmp_path / "again.pt").read_bytes()
    assert b"${ACT}" in data and b"gelu" not in data
