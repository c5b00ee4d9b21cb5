"""timm: and hf: model sources (tiny configs, random init, offline) and their one-line errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from compress.errors import CompressError, RecipeError
from compress.models import create_model, parse_model_spec
from compress.models.adapter import adapter_of

os.environ["HF_HUB_OFFLINE"] = "1"
BERT = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 64, "vocab_size": 100, "max_position_embeddings": 64}
TIMM_VIT = {"name": "timm:vit_tiny_patch16_224",
            "kwargs": {"img_size": 28, "patch_size": 7, "embed_dim": 48, "depth": 2, "num_heads": 3}}


def test_timm_vit_declares_head_first_layer_and_attention_heads():
    pytest.importorskip("timm", reason="timm is the optional extra compress[timm]")
    m = create_model(TIMM_VIT, (1, 28, 28), 10)
    a = adapter_of(m)
    assert m(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert (a.head, a.first_layer, a.family) == ("head", "patch_embed.proj", "timm")
    assert a.num_heads == {"blocks.0.attn.qkv": 3, "blocks.1.attn.qkv": 3}


def test_hf_text_classifier_takes_named_inputs(tmp_path):
    pytest.importorskip("transformers", reason="transformers is the optional extra compress[hf]")
    from compress.checkpoint import load_model, save_model
    from compress.data.inputs import Inputs

    m = create_model({"name": "hf", "config": BERT}, (16,), 3).eval()
    x = Inputs(input_ids=torch.randint(0, 100, (2, 16)), attention_mask=torch.ones(2, 16, dtype=torch.long))
    assert m(x).shape == (2, 3) and adapter_of(m).head == "model.classifier"
    assert len(adapter_of(m).num_heads) == 6
    save_model(m, tmp_path / "m.pt")
    assert torch.allclose(load_model(tmp_path / "m.pt").eval()(x), m(x), atol=1e-6)


def test_hf_folder_errors_are_one_line(tmp_path):
    pytest.importorskip("transformers", reason="transformers is the optional extra compress[hf]")
    with pytest.raises(RecipeError, match="model.name: .* is not a Hugging Face model folder"):
        create_model({"name": f"hf:{tmp_path}"}, (16,), 3)
    with pytest.raises(RecipeError, match="model.config: transformers cannot read"):
        create_model({"name": "hf", "config": {"model_type": "no_such_type"}}, (16,), 3)


def test_a_missing_extra_names_the_install_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "timm" else real(name, *a))
    with pytest.raises(RecipeError, match=r"model.name: 'timm:' models need .*pip install 'compress\[timm\]'"):
        parse_model_spec({"name": "timm:resnet18"})


def test_torchvision_prefix_builds_the_same_model():
    m = create_model({"name": "torchvision:mobilenet_v3_small"}, (3, 32, 32), 4).eval()
    assert m(torch.zeros(1, 3, 32, 32)).shape == (1, 4)
    with pytest.raises(RecipeError, match="torchvision has no classifier 'nope'"):
        parse_model_spec({"name": "torchvision:nope"})


def test_hf_hub_id_offline_is_one_line_naming_the_hub():
    pytest.importorskip("transformers", reason="transformers is the optional extra compress[hf]")
    with pytest.raises(RecipeError) as e:  # HF_HUB_OFFLINE=1 and an empty cache: nothing to fetch
        create_model({"name": "hf:compress-tests/no-such-model"}, (16,), 3)
    assert e.value.path == "model.name" and "hub" in str(e.value) and "\n" not in str(e.value)


def test_timm_pretrained_download_failure_is_one_line(monkeypatch):
    timm = pytest.importorskip("timm", reason="timm is the optional extra compress[timm]")

    def offline(*args, pretrained=False, **kwargs):
        if pretrained:
            raise ConnectionError("network is unreachable\nlong traceback text")
        return real(*args, **kwargs)

    real = timm.create_model
    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(RecipeError) as e:
        create_model({**TIMM_VIT, "pretrained": True}, (1, 28, 28), 10)
    assert e.value.path == "model.pretrained" and "network is unreachable" in str(e.value)
    assert "\n" not in str(e.value)
    with pytest.raises(RecipeError, match="either"):
        create_model({**TIMM_VIT, "pretrained": True, "weights": __file__}, (1, 28, 28), 10)


def test_a_checkpoint_of_a_pretrained_timm_model_reloads_without_downloading(tmp_path, monkeypatch):
    timm = pytest.importorskip("timm", reason="timm is the optional extra compress[timm]")
    from compress.checkpoint import load_model, save_model

    real, asked = timm.create_model, []

    def recording(*args, pretrained=False, **kwargs):
        asked.append(pretrained)
        return real(*args, **kwargs)  # stands in for the download

    monkeypatch.setattr(timm, "create_model", recording)
    m = create_model({**TIMM_VIT, "pretrained": True}, (1, 28, 28), 10).eval()
    save_model(m, tmp_path / "m.pt")
    again = load_model(tmp_path / "m.pt").eval()
    x = torch.randn(2, 1, 28, 28)
    # reloaded twice without weights: on the meta device (checked against the file), then for real
    assert asked == [True, False, False] and torch.equal(again(x), m(x))


def test_a_checkpoint_of_an_hf_folder_model_reloads_without_reading_its_weights(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers", reason="transformers is the optional extra compress[hf]")
    from compress.checkpoint import load_model, save_model

    folder = tmp_path / "bert"
    transformers.BertForSequenceClassification(transformers.BertConfig(**BERT, num_labels=3)).save_pretrained(folder)
    m = create_model({"name": f"hf:{folder}"}, (16,), 3).eval()
    save_model(m, tmp_path / "m.pt")
    (folder / "model.safetensors").write_bytes(b"no longer weights")  # a reload must not read them
    assert isinstance(load_model(tmp_path / "m.pt"), torch.nn.Module)


# -- hostile folders, weights and hub ids (issue 24): nothing runs, nothing is downloaded, one line ----------
ROOT = Path(__file__).resolve().parents[2]
EVIL = """import pathlib
pathlib.Path({marker!r}).write_text("ran")
from transformers import BertConfig as EvilConfig, BertForSequenceClassification as EvilModel
"""


def _hf_folder(folder, code=False):
    """A tiny BERT folder; ``code``: its config's auto_map names evil.py, which writes folder/ran when imported."""
    from transformers import BertConfig

    BertConfig(**{k: v for k, v in BERT.items() if k != "model_type"}).save_pretrained(folder)
    if code:
        cfg = json.loads((folder / "config.json").read_text())
        cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForSequenceClassification": "evil.EvilModel"}
        (folder / "config.json").write_text(json.dumps(cfg))
        (folder / "evil.py").write_text(EVIL.format(marker=str(folder / "ran")))
    return folder


def _checkpoint_naming(path, name):
    """A compress checkpoint of a tiny BERT whose spec names ``name`` (a folder or a hub id) instead."""
    from compress.checkpoint_io import model_state

    state = model_state(create_model({"name": "hf", "config": BERT}, (16,), 3))
    torch.save({**state, "spec": {"name": name}}, path)
    return path


class _Payload:
    """Pickles as a call to os.makedirs(marker): unpickling it runs code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


@pytest.fixture
def no_stdin(monkeypatch):
    """transformers must never ask: a prompt is recorded and answered with end of input."""
    asked = []

    def ask(prompt=""):
        asked.append(prompt)
        raise EOFError

    monkeypatch.setattr("builtins.input", ask)
    monkeypatch.delenv("COMPRESS_ALLOW_IMPORT", raising=False)
    return asked


@pytest.mark.parametrize("load", [
    lambda folder, tmp: create_model({"name": f"hf:{folder}"}, (16,), 3),
    lambda folder, tmp: __import__("compress").load_model(_checkpoint_naming(tmp / "m.pt", f"hf:{folder}")),
], ids=["hf-folder", "checkpoint-naming-it"])
def test_a_folder_asking_to_run_its_code_is_refused_without_the_opt_in(tmp_path, no_stdin, load):
    pytest.importorskip("transformers", reason="transformers is the optional extra compress[hf]")
    folder = _hf_folder(tmp_path / "evil", code=True)
    with pytest.raises(CompressError) as e:  # a RecipeError from a recipe, named after the file from a checkpoint
        load(folder, tmp_path)
    assert f"'{folder}' asks to run its own Python (auto_map in config.json)" in str(e.value)
    assert "--allow-import" in str(e.value) and "\n" not in str(e.value)
    assert no_stdin == [] and not (folder / "ran").exists()


def _timm_weights(tmp, marker):
    pytest.importorskip("timm", reason="timm is the optional extra compress[timm]")
    torch.save({"head.weight": _Payload(marker)}, tmp / "evil.pth")
    return lambda: create_model({**TIMM_VIT, "weights": str(tmp / "evil.pth")}, (1, 28, 28), 10), tmp / "evil.pth"


def _hf_bin(tmp, marker):
    pytest.importorskip("transformers", reason="transformers is the optional extra compress[hf]")
    folder = _hf_folder(tmp / "bert")
    torch.save({"bert.embeddings.word_embeddings.weight": _Payload(marker)}, folder / "pytorch_model.bin")
    return lambda: create_model({"name": f"hf:{folder}"}, (16,), 3), folder / "pytorch_model.bin"


@pytest.mark.parametrize("build", [_timm_weights, _hf_bin], ids=["timm-weights", "hf-pytorch_model.bin"])
def test_a_pickle_that_runs_code_is_one_line_naming_the_file(tmp_path, build):
    marker = tmp_path / "ran"
    load, path = build(tmp_path, marker)
    with pytest.raises(CompressError) as e:
        load()
    assert f"'{path}': not a loadable weights file: not weights-only" in str(e.value) and "\n" not in str(e.value)
    assert not marker.exists()


def test_timm_kwargs_that_load_weights_by_timms_rules_are_refused():
    pytest.importorskip("timm", reason="timm is the optional extra compress[timm]")
    with pytest.raises(CompressError, match=r"model.kwargs: checkpoint_path is not passed to timm: give weights:"):
        parse_model_spec({**TIMM_VIT, "kwargs": {"checkpoint_path": "/elsewhere/x.pth"}})


# Runs compress commands in a fresh process whose sockets refuse to connect (and record that they were
# asked), with an empty Hugging Face cache and no HF_HUB_OFFLINE: only compress keeps it off the network.
NO_NETWORK = r"""
import json, socket, sys
from pathlib import Path
tried = []
def refuse(*args, **kwargs):
    tried.append(repr(args)[:80])
    raise OSError("the test allows no network")
socket.socket.connect = socket.socket.connect_ex = lambda self, *a: refuse(*a)
socket.create_connection = socket.getaddrinfo = refuse
from click.testing import CliRunner
from compress.cli import cli
out = []
for case in json.loads(sys.argv[1]):
    r = CliRunner().invoke(cli, case["args"], input="y\n", env=case.get("env", {}))
    out.append({"code": r.exit_code, "output": r.output, "tried": tried[:], "ran": Path(case["marker"]).exists()})
    tried.clear()
print(json.dumps(out))
"""


def test_loading_checking_and_measuring_never_reach_the_network_nor_run_a_folders_code(tmp_path):
    pytest.importorskip("transformers", reason="transformers is the optional extra compress[hf]")
    pytest.importorskip("timm", reason="timm is the optional extra compress[timm]")
    folder = _hf_folder(tmp_path / "evil", code=True)
    marker = str(folder / "ran")
    hub, evil = _checkpoint_naming(tmp_path / "hub.pt", "hf:compress-tests/tiny"), _checkpoint_naming(tmp_path / "e.pt", f"hf:{folder}")
    (tmp_path / "t.csv").write_text("text,label\n" + "".join(f"title {i},{i % 2}\n" for i in range(40)))

    def recipe(name, model):
        doc = {"name": name, "data": {"name": "text", "path": str(tmp_path / "t.csv"), "max_length": 16,
                                      "tokenizer": {"vocab_size": 100}},
               "model": model, "stages": [{"train": {"epochs": 1}}]}
        if model["name"].startswith(("timm", "torchvision")):
            doc["data"] = {"name": "synthetic", "num_samples": 32, "num_classes": 3, "shape": [1, 28, 28]}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(doc))
        return str(tmp_path / f"{name}.yaml")

    cases = [  # (arguments, environment, exit status, what the one line says)
        (["pack", str(hub), "-o", str(tmp_path / "h.cpk")], {}, 2, f"not in the local Hugging Face cache, and nothing is downloaded while {hub} is loaded"),
        (["bench", str(hub), "--recipe", recipe("text", {"name": "hf", "config": BERT})], {}, 2, f"while {hub} is loaded"),
        (["validate", recipe("hub", {"name": "hf:compress-tests/tiny"})], {}, 2, "model.name: 'compress-tests/tiny' is not in the local"),
        (["validate", recipe("timm", {**TIMM_VIT, "pretrained": True})], {}, 0, "ok: timm"),
        (["validate", recipe("tv", {"name": "torchvision:squeezenet1_0", "weights": "DEFAULT", "in_chans": 1})], {}, 0, "ok: tv"),
        (["validate", recipe("evil", {"name": f"hf:{folder}"})], {"COMPRESS_ALLOW_IMPORT": "1"}, 2,
         f"model.name: '{folder}' asks to run its own Python (auto_map in config.json); it is never run while a recipe is only checked"),
        (["pack", str(evil), "-o", str(tmp_path / "e.cpk")], {}, 2, f"'{folder}' asks to run its own Python"),
        (["pack", str(evil), "-o", str(tmp_path / "e.cpk"), "--allow-import"], {}, 0, "e.cpk"),  # opted in: it runs
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "COMPRESS_ALLOW_IMPORT")}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_MODULES_CACHE=str(tmp_path / "modules"), TORCH_HOME=str(tmp_path / "torch"),
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    arg = json.dumps([{"args": a, "env": e, "marker": marker} for a, e, _, _ in cases])
    proc = subprocess.run([sys.executable, "-c", NO_NETWORK, arg], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for (args, _, code, words), got in zip(cases, results):
        assert got["tried"] == [], (args, got)
        assert got["code"] == code and words in got["output"], (args, got["output"])
        if code == 2:
            assert got["output"].startswith("error: ") and len(got["output"].strip().splitlines()) == 1, got["output"]
        assert got["ran"] == ("--allow-import" in args), args
