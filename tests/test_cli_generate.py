"""``compress generate``: a tiny causal LM continues a prompt from its HF folder, a compress checkpoint or an
ONNX file with a cache; a missing tokenizer or cache is one line."""
import numpy as np
import pytest
from click.testing import CliRunner

from compress.cli import cli

TEXTS = ["def add(a, b): return a + b", "for i in range(10): print(i)", "class Point: pass",
         "import os, sys", "while True: break", "return None if x else y"] * 4


@pytest.fixture(scope="module")
def lm_folder(tiny_lm, tmp_path_factory):
    """A tiny Llama saved with a BPE tokenizer trained here on a few lines of code (vocabulary <= 100)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("lm")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=100, special_tokens=["<unk>", "</s>"], show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>").save_pretrained(folder)
    tiny_lm("llama", vocab=128).save_pretrained(folder)
    return folder


def _run(*args):
    return CliRunner().invoke(cli, ["generate", *map(str, args)])


def test_generate_from_a_folder_and_an_onnx_file(lm_folder, tmp_path):
    from transformers import AutoModelForCausalLM

    from compress.runtime.lm_export import export_lm

    r = _run(lm_folder, "--prompt", "def add", "--max-new-tokens", 8)
    assert r.exit_code == 0, r.output
    text = r.output.strip()
    assert text.startswith("def add") and len(text) > len("def add")
    onnx = export_lm(AutoModelForCausalLM.from_pretrained(lm_folder), tmp_path / "m.onnx")
    r2 = _run(onnx, "--prompt", "def add", "--max-new-tokens", 8, "--tokenizer", lm_folder)
    assert r2.exit_code == 0 and r2.output == r.output  # greedy: the ONNX file says what PyTorch says
    sampled = [_run(lm_folder, "--prompt", "def add", "--max-new-tokens", 8, "--temperature", 1.5, "--seed", s).output
               for s in (1, 1, 2)]
    assert sampled[0] == sampled[1] and sampled[0].startswith("def add")
    assert sampled[0] != r.output or sampled[2] != r.output  # sampling is not greedy


def test_missing_tokenizer_and_cache_are_one_line(lm_folder, tmp_path):
    import torch

    from compress.runtime.onnx import to_onnx

    from transformers import AutoModelForCausalLM

    from compress.runtime.lm_export import export_lm

    onnx = export_lm(AutoModelForCausalLM.from_pretrained(lm_folder), tmp_path / "m.onnx")
    r = _run(onnx, "--prompt", "x")
    assert r.exit_code == 2 and r.output.strip().startswith("error: ") and "pass --tokenizer FOLDER" in r.output
    assert len(r.output.strip().splitlines()) == 1
    plain = to_onnx(torch.nn.Embedding(4, 2), torch.zeros(1, 3, dtype=torch.long), tmp_path / "plain.onnx")
    r = _run(plain, "--prompt", "x", "--tokenizer", lm_folder)
    assert r.exit_code == 2 and "not a language model file" in r.output
    r = _run(tmp_path / "nothing", "--prompt", "x")
    assert r.exit_code == 2 and "no such file or folder" in r.output


def test_bench_of_an_lm_file_needs_no_recipe(lm_folder, tmp_path, monkeypatch):
    import functools
    import json

    from compress.measure import generation

    monkeypatch.setattr(generation, "measure_generation", functools.partial(generation.measure_generation, runs=5, warmup=1))

    from transformers import AutoModelForCausalLM

    from compress.runtime.lm_export import export_lm

    onnx = export_lm(AutoModelForCausalLM.from_pretrained(lm_folder), tmp_path / "m.onnx")
    r = CliRunner().invoke(cli, ["bench", str(onnx), "--baseline", str(onnx), "--json", str(tmp_path / "g.json")])
    assert r.exit_code == 0, r.output
    rows = json.loads((tmp_path / "g.json").read_text())["generation"]
    assert {(g["batch"], g["threads"] == 1) for g in rows} == {(1, True), (4, True), (1, False), (4, False)}
    assert "| m.onnx | onnxruntime | 4 | 1 |" in r.output
    r = CliRunner().invoke(cli, ["bench", str(tmp_path / "nothing.onnx")])
    assert r.exit_code == 2 and "without --recipe" in r.output


def test_a_run_saves_the_tokenizer_it_trained_and_generate_finds_it(lm_corpus, tmp_path):
    """No --tokenizer: a checkpoint of a run on lm data with a trained BPE generates with that BPE."""
    import yaml

    from tests.conftest import TINY_LM, lm_data_spec

    recipe = {"name": "g", "data": lm_data_spec(lm_corpus), "model": {"name": "hf", "config": {**TINY_LM["llama"], "vocab_size": 300}},
              "benchmark": {"latency": False}, "stages": [{"train": {"epochs": 1, "progress": False}}]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    r = CliRunner().invoke(cli, ["run", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "run" / "tokenizer.json").is_file()
    model = next((tmp_path / "run" / "stages").glob("*/model.pt"))
    g = _run(model, "--prompt", "def x0", "--max-new-tokens", 4)
    assert g.exit_code == 0 and g.output.startswith("def x0"), g.output
