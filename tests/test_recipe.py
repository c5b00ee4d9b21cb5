"""Malformed recipes: one line naming the key path, exit status 2, nothing written."""
import contextlib
import copy
import signal
import tempfile
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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
    ("stages.0.train.model=[{name: mlp}, {name: mlp}]", "stages[0].train.model: expected one model spec (a mapping with a 'name' key), got a list"),
    ("stages=[{distill: {teacher: [{name: mlp}], student: [{name: mlp, hidden: [4]}]}}]",
     "stages[0].distill.student: expected one model spec (a mapping with a 'name' key), got a list"),
    ("stages.5.train.epochs=1", "--set stages.5.train.epochs: stages is a list of 1"),
    ("name=a b", "name: expected a plain run name"),
    ("name=..", "name: expected a plain run name"),
    ("name=.", "name: expected a plain run name"),
    ("name=a/b", "name: expected a plain run name"),
    ("name=" + "x" * 65, "name: expected a plain run name"),
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
    # --allow-import: the import: rows here are about what a run reports, not about the opt-in
    result = CliRunner().invoke(cli, ["run", str(base_file), "--set", override, "--out", str(out), "--allow-import"])
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


# -- hostile input (issue 15): one row per class; each must be one 'error:' line naming the key path or
# file, exit status 2, no traceback. Builders return the command line; the base recipe is BASE.

def _write(tmp_path, data) -> str:
    path = tmp_path / "r.yaml"
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return str(path)


def _text(extra: str = "", **replace) -> str:
    text = yaml.safe_dump(BASE, sort_keys=False) + extra
    for old, new in replace.items():
        text = text.replace(old, new)
    return text


def _yaml(data):
    return lambda tmp_path, monkeypatch: ["validate", _write(tmp_path, data)]


def _set(*overrides, command="validate"):
    def build(tmp_path, monkeypatch):
        args = [command, _write(tmp_path, _text())]
        for o in overrides:
            args += ["--set", o]
        return args + (["--out", str(tmp_path / "run")] if command == "run" else [])
    return build


def _one_gpu(override):
    def build(tmp_path, monkeypatch):
        import torch

        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
        return _set(override)(tmp_path, monkeypatch)
    return build


def _csv_with_nan(tmp_path, monkeypatch):
    (tmp_path / "d.csv").write_text("a,b,target\n" + "".join(f"{i},{i * 2},{i % 2}\n" for i in range(5)) + "3,nan,1\n")
    return _set(f"data={{name: csv, path: {tmp_path / 'd.csv'}}}")(tmp_path, monkeypatch)


def _npz_with_nan(tmp_path, monkeypatch):
    import numpy as np

    x = np.ones((20, 4), dtype=np.float32)
    x[7, 2] = np.nan
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(20) % 2)
    return _set(f"data={{name: npz, path: {tmp_path / 'd.npz'}}}")(tmp_path, monkeypatch)


def _truncated_png(tmp_path, monkeypatch):
    from compress.data.imagefolder import write_shapes_folder

    root = write_shapes_folder(tmp_path / "img", num_classes=2, train_per_class=4, val_per_class=2, size=16)
    png = root / "train" / "circle" / "train_0_0001.png"
    png.write_bytes(png.read_bytes()[:200])
    return _set(f"data={{name: imagefolder, root: {root}, image_size: 16, random_resized_crop: false}}",
                "model={name: smallcnn, widths: [4]}", command="run")(tmp_path, monkeypatch)


def _file_as_out(tmp_path, monkeypatch):
    (tmp_path / "plain").write_text("a file, not a folder")
    return ["run", _write(tmp_path, _text()), "--out", str(tmp_path / "plain" / "run")]


def _export_under_file(tmp_path, monkeypatch):
    (tmp_path / "plain").write_text("a file, not a folder")
    return _set(f"stages=[{{export: {{path: {tmp_path / 'plain' / 'm.onnx'}}}}}]")(tmp_path, monkeypatch)


def _bomb() -> str:
    lines = ["l0: &l0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, 9)]
    return "unknown_key:\n" + "\n".join("  " + ln for ln in lines) + "\n"


HOSTILE = [
    # YAML itself (file and line/column named)
    ("yaml duplicate key", _yaml(_text("seed: 1\nseed: 3\n")), ["r.yaml, line 13, column 1: duplicate key 'seed' (first given at line 12)"]),
    ("yaml duplicate stages", _yaml(_text("stages: []\n")), ["duplicate key 'stages'"]),
    ("yaml recursive alias", _yaml(_text("extra: &a [*a]\n")), ["r.yaml, line", "recursive alias *a"]),
    ("yaml alias bomb under an unknown key", _yaml(_text(_bomb())), ["r.yaml, line", "once aliases are expanded"]),
    ("yaml deep flow list", _yaml(_text("extra: " + "[" * 5000 + "]" * 5000 + "\n")), ["r.yaml, line", "nested deeper"]),
    ("yaml latin-1", _yaml(_text("# café\n").encode("latin-1")), ["r.yaml: not UTF-8 text (byte 0xe9 at line"]),
    ("yaml utf-16", _yaml(_text().encode("utf-16")), ["r.yaml: the file is UTF-16 text"]),
    ("yaml binary garbage", _yaml(bytes(range(256)) * 8), ["r.yaml: not UTF-8 text"]),
    ("yaml !!set for a list", _yaml(_text().replace("hidden:\n  - 16", "hidden: !!set {16: null}")), ["r.yaml, line", "!!set is not allowed"]),
    ("yaml oversized file", _yaml(_text("#" * (1 << 20))), ["r.yaml:", "too large for a recipe"]),
    # numbers (key path named)
    ("inf learning rate", _set("stages.0.train.optimizer.lr=.inf"), ["stages[0].train.optimizer.lr: expected a finite number > 0, got inf"]),
    ("inf as text", _set("stages.0.train.optimizer.lr=inf"), ["stages[0].train.optimizer.lr: expected a finite number"]),
    ("nan fraction", _set("data.val_fraction=.nan"), ["data.val_fraction: expected a finite number in [0, 1), got nan"]),
    ("inf in free-form kwargs", _set("model={import: 'torch.nn:Linear', kwargs: {in_features: .inf, out_features: 10}}"),
     ["model.kwargs: expected a finite number, got inf at .in_features"]),
    ("zero width", _set("model.hidden=[0]"), ["model.hidden[0]: expected an integer in [1, 65536], got 0"]),
    ("negative width", _set("model.hidden=[16, -4]"), ["model.hidden[1]: expected an integer in [1, 65536], got -4"]),
    ("width 2**64", _set("model.hidden=[18446744073709551616]"), ["model.hidden[0]: expected an integer in [1, 65536]"]),
    ("width 1e308", _set("model.hidden=[1.0e+308]"), ["model.hidden[0]: expected an integer in [1, 65536]"]),
    ("seed 2**62", _set("seed=4611686018427387904"), ["seed: expected an integer in [0, 4294967295]"]),
    ("integer beyond int64", _set("stages.0.train.epochs=1180591620717411303424"),
     ["stages[0].train.epochs: expected an integer of at most 2**63-1"]),
    # devices
    ("missing gpu index", _one_gpu("stages.0.train.device=cuda:7"), ["stages[0].train.device: 'cuda:7': this machine has 1 CUDA GPU"]),
    ("unknown device", _set("stages.0.train.device=banana"), ["stages[0].train.device: expected 'auto', 'cpu'"]),
    # data (file and row named)
    ("nan cell in a csv", _csv_with_nan, ["data.path:", "d.csv', line 7, column 2 ('b'): expected a finite number, got 'nan'"]),
    ("nan in an npz", _npz_with_nan, ["data.path:", "d.npz', array 'x', row 7: expected finite numbers, got nan"]),
    ("truncated png", _truncated_png, ["data.root:", "train_0_0001.png' is not a readable image"]),
    # training that diverges
    ("loss becomes nan", _set("stages.0.train.optimizer={name: sgd, lr: 1.0e+30}", command="run"),
     ["stages[0].train: training diverged in epoch 1/1", "learning rate"]),
    # files
    ("--out under a file", _file_as_out, ["--out:", "plain' is a file"]),
    ("export path under a file", _export_under_file, ["stages[0].export.path:", "plain' is a file"]),
]


@pytest.mark.parametrize("build,expected", [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE])
def test_hostile_input_is_one_line_exit_2(tmp_path, monkeypatch, build, expected):
    result = CliRunner().invoke(cli, build(tmp_path, monkeypatch))
    assert result.exit_code == 2, (result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for text in expected:
        assert text in lines[0]
    assert "Traceback" not in result.output


# -- property: any mutation of a valid recipe gets exit 0 or 2 from `compress validate`, never a traceback,
# never a hang. Values are bounded so no mutation can ask for a real allocation (widths <= 40 or refused).

FUZZ_VALUES = st.one_of(
    st.sampled_from([None, True, "", "x", "inf", "nan", ".inf", "cuda:7", "banana", "${NOPE}", "${NOPE:-3}", "../..",
                     "é", "a" * 300, 0.5, -0.0, 1e308, float("inf"), float("-inf"), float("nan"), 2**31, 2**63, 2**64,
                     -2**70, [], {}, [None], [0], [-1], {"x": 1}, {"name": None}, [[[[1]]]]]),
    st.integers(-3, 40), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
)
FUZZ_KEYS = ["name", "seed", "data", "model", "teacher", "stages", "benchmark", "output", "hidden", "epochs", "lr",
             "optimizer", "device", "batch_size", "val_fraction", "path", "root", "train", "evaluate", "prune",
             "quantize", "distill", "export", "dir", "unknown", "<<"]
FUZZ_SNIPPETS = ["&a [*a]", "*a", "*b", "!!set {1: null}", "!!python/name:os.system", "{", "]", ": ", "\x00", "\t", "- ",
                 "? ", "<<: *a", "seed: 1\n", "stages: []\n", "\ufeff", "%YAML 1.1\n---\n", "...\n", "&b ", "'", "#"]
FUZZ_BASE = {**BASE, "seed": 0, "benchmark": {"latency": False}}


def _paths(node, prefix=()):
    yield prefix
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        yield from _paths(v, prefix + (k,))


def _mutate(doc, draw):
    paths = [p for p in _paths(doc) if p]
    kind = draw(st.sampled_from(["set", "delete", "add"]))
    path = draw(st.sampled_from(paths))
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    if kind == "set":
        parent[path[-1]] = copy.deepcopy(draw(FUZZ_VALUES))  # sampled lists/dicts are shared objects
    elif kind == "delete":
        del parent[path[-1]]
    else:
        target = parent[path[-1]] if isinstance(parent[path[-1]], dict) else parent
        if isinstance(target, dict):
            target[draw(st.sampled_from(FUZZ_KEYS))] = copy.deepcopy(draw(FUZZ_VALUES))
        else:
            target.append(copy.deepcopy(draw(FUZZ_VALUES)))


@contextlib.contextmanager
def _no_hang(seconds: int):
    """Fail an example that runs past ``seconds`` (a hang, not a slow run: the bound is generous)."""
    def stop(*_):
        raise AssertionError(f"compress validate ran past {seconds} s")
    if not hasattr(signal, "SIGALRM"):
        yield
        return
    old = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_recipes_exit_0_or_2_never_a_traceback(data):
    doc = copy.deepcopy(FUZZ_BASE)
    for _ in range(data.draw(st.integers(0, 3))):
        _mutate(doc, data.draw)
    text = yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)
    for _ in range(data.draw(st.integers(0, 2))):
        at = data.draw(st.integers(0, len(text)))
        text = text[:at] + data.draw(st.sampled_from(FUZZ_SNIPPETS)) + text[at:]
    raw = text.encode(data.draw(st.sampled_from(["utf-8", "utf-8", "utf-8", "latin-1", "utf-16"])), errors="replace")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "r.yaml"
        path.write_bytes(raw)
        with _no_hang(30):
            result = CliRunner().invoke(cli, ["validate", str(path)])
    assert result.exit_code in (0, 2), (text, result.output, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), (text, result.exception)
    assert "Traceback" not in result.output
    if result.exit_code == 2:
        assert all(line.startswith("error: ") for line in result.stderr.strip().splitlines()), result.stderr
