"""``compress quantize x.onnx`` / ``compress.quantize("x.onnx")``: an existing float ONNX file becomes a loadable
int8 file with its agreement number, and every file it cannot handle is one line (exit 2)."""
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

import compress
from compress.cli import cli
from compress.measure.config import BenchmarkConfig
from compress.models import create_model
from compress.runtime.onnx import onnx_session

ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]
FAST = BenchmarkConfig(runs=5, warmup=0, min_sample_ms=0, progress=False)  # structure only: no timing asserted


def _export(model, path, dynamic=True, name="input"):
    axes = {name: {0: "batch"}} if dynamic else None
    torch.onnx.export(model, torch.randn(1, 1, 12, 12), str(path), dynamo=False, input_names=[name],
                      dynamic_axes=axes)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("onnx_file")
    torch.manual_seed(0)
    model = create_model("lenet5", (1, 12, 12), 4).eval()
    np.savez(d / "cal.npz", x=np.random.default_rng(0).random((96, 1, 12, 12)))  # float64, as numpy makes it
    return {"dir": d, "model": _export(model, d / "tiny.onnx"), "fixed": _export(model, d / "fixed.onnx", False, "input.1"),
            "npz": d / "cal.npz", "torch": model}


def _is_int8(path):
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    onnx_session(path)  # loads in ONNX Runtime
    return "QuantizeLinear" in ops


def test_cli_writes_a_loadable_int8_file_and_prints_its_agreement(files, tmp_path):
    out = tmp_path / "q.onnx"
    run = subprocess.run([sys.executable, "-m", "compress", "quantize", str(files["model"]), "--data", str(files["npz"]),
                          "-o", str(out), "--samples", "64", "--no-latency"], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert _is_int8(out)
    assert "top-1 agreement" in run.stdout and "64 samples" in run.stdout and "32 held-out samples" in run.stdout


def test_python_api_takes_a_path_and_reports_agreement_and_latency(files, tmp_path):
    out = tmp_path / "q.onnx"
    model, m = compress.quantize(str(files["model"]), data=files["npz"], out=out, benchmark=FAST)
    assert _is_int8(out) and m["artifact"] == str(out)
    assert 0 <= m["int8_check"]["top1_agreement"] <= 1 and m["held_out_samples"] == 24
    assert {"1", "32"} <= set(m["latency"]) and m["latency"]["32"]["speedup"] > 0
    x = torch.from_numpy(np.load(files["npz"])["x"][:5]).float()
    assert model(x).shape == (5, 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.onnx"]  # scratch files stay out of the output folder


def test_a_file_fixed_to_batch_1_with_any_input_name_and_a_data_block(files, tmp_path):
    data = {"name": "synthetic", "num_samples": 200, "num_classes": 4, "shape": [1, 12, 12]}
    _, m = compress.quantize(files["fixed"], data=data, out=tmp_path / "q.onnx", benchmark=BenchmarkConfig(latency=False))
    assert _is_int8(tmp_path / "q.onnx") and m["latency"] is None
    assert "accuracy" in m and "accuracy" in m["fp32_onnx_metrics"]  # the data block has labels


def test_cli_takes_a_recipes_data_section(files, tmp_path, monkeypatch):
    monkeypatch.setenv("SAMPLES", "200")
    recipe = tmp_path / "r.yaml"  # a whole recipe, named: its data: section is used, ${VARS} resolved
    recipe.write_text("name: r\ndata:\n  name: synthetic\n  num_samples: ${SAMPLES}\n  num_classes: 4\n"
                      "  shape: [1, 12, 12]\nmodel: {name: mlp}\nstages: [{train: {epochs: 1}}]\n")
    res = CliRunner().invoke(cli, ["quantize", str(files["fixed"]), "--data", str(recipe), "-o", str(tmp_path / "q.onnx"),
                                   "--no-latency"])
    assert res.exit_code == 0, res.output
    assert "accuracy" in res.output and "top-1 agreement" in res.output and _is_int8(tmp_path / "q.onnx")


def test_qat_is_no_method_for_a_file(files):
    with pytest.raises(compress.CompressError, match="quantize.method: qat quantizes a PyTorch model; an .onnx file "
                                                     "takes lm_dynamic or nbits or ptq_dynamic or ptq_static"):
        compress.quantize(files["model"], compress.QuantizeConfig(method="qat"), data=files["npz"])


def _bad_files(d, model):
    (d / "text.onnx").write_text("not a model\n")
    onnx.save(onnx.load(str(d / "tiny.onnx")), str(d / "ext.onnx"), save_as_external_data=True, location="ext.data",
              size_threshold=0)
    m = onnx.load(str(d / "tiny.onnx"))
    m.graph.node[0].input[0] = "nowhere"
    onnx.save(m, str(d / "broken.onnx"))
    emb = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Flatten())
    torch.onnx.export(emb, torch.zeros(2, 3, dtype=torch.long), str(d / "ints.onnx"), dynamo=False)
    np.savez(d / "small.npz", x=np.zeros((20, 1, 8, 8), np.float32))
    np.savez(d / "labels.npz", x=np.zeros((20, 1, 12, 12), np.int64))
    (d / "taken.onnx").write_bytes(b"keep me")


@pytest.mark.parametrize("args,message", [
    (["text.onnx"], "text.onnx: not an ONNX model"),
    (["broken.onnx"], "broken.onnx: ONNX Runtime cannot load it"),
    (["ext.onnx"], "ext.onnx: keeps tensor data in external files"),
    (["ints.onnx"], "ints.onnx: no float input (input 'input' is int64)"),
    (["tiny.onnx", "--data", "small.npz"], "small.npz gives inputs of shape (1, 8, 8) per sample; tiny.onnx takes "
                                           "'input' as float32 (batch, 1, 12, 12)"),
    (["tiny.onnx", "--data", "labels.npz"], "labels.npz gives int64 inputs"),
    (["tiny.onnx", "-o", "taken.onnx"], "taken.onnx: exists; pass --force to replace it"),
    (["missing.onnx"], "missing.onnx: no such file"),
    (["tiny.onnx", "--data", "nothing.npz"], "--data: no such file 'nothing.npz'"),
])
def test_each_file_it_cannot_handle_is_one_line_exit_2(files, monkeypatch, args, message):
    d = files["dir"]
    if not (d / "text.onnx").exists():
        _bad_files(d, files["torch"])
    monkeypatch.chdir(d)
    argv = ["quantize", *args, "--no-latency"] + ([] if "--data" in args else ["--data", "cal.npz"])
    res = CliRunner().invoke(cli, argv + ([] if "-o" in args else ["-o", "out.onnx"]))
    lines = res.output.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], res.output
    assert (d / "taken.onnx").read_bytes() == b"keep me" and not (d / "out.onnx").exists()


# -- a language model's file with a key-value cache: nbits / lm_dynamic -------------------------------------

@pytest.fixture(scope="module")
def lm_files(tmp_path_factory, lm_corpus, tiny_lm):
    from compress.runtime.lm_export import export_lm
    from tests.conftest import lm_data_spec

    d = tmp_path_factory.mktemp("lm_file")
    recipe = d / "r.yaml"  # a recipe with an lm data block (its tokenizer: a 300-token BPE)
    recipe.write_text(__import__("yaml").safe_dump({"name": "r", "data": lm_data_spec(lm_corpus), "model": {"name": "hf"}}))
    return {"dir": d, "lm": export_lm(tiny_lm("llama", vocab=300).eval(), d / "lm.onnx"), "recipe": recipe,
            "spec": lm_data_spec(lm_corpus)}


def test_cli_nbits_on_an_lm_file_prints_its_perplexity_check_and_generation_speed(lm_files, tmp_path):
    from compress.data import create_data
    from compress.quant.ptq_onnx import op_counts
    from compress.runtime.generate import lm_blocks, onnx_perplexity

    out = tmp_path / "q.onnx"
    res = CliRunner().invoke(cli, ["quantize", str(lm_files["lm"]), "--method", "nbits", "--set", "bits=4", "--set",
                                   "block_size=32", "--set", "algorithm=rtn", "--set", "check.max_ratio=2",
                                   "--data", str(lm_files["recipe"]), "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert op_counts(out)["MatMulNBits"] == 14  # 2 layers x (q, k, v, o, gate, up, down); the LM head stays float
    val = lm_blocks(create_data(lm_files["spec"]), "val", 10 ** 9)
    ppl = {line.split()[4] for line in res.output.splitlines() if line.startswith("perplexity, val split")}
    assert ppl == {f"{onnx_perplexity(out, val):.2f}"}  # the file's own perplexity on the validation blocks
    assert "nbits: int4 rtn, block 32" in res.output and "perplexity check, 16 blocks" in res.output
    assert "prefill 128 tokens" in res.output and "tok/s" in res.output and "top-1 agreement" not in res.output


def test_cli_lm_dynamic_takes_an_npz_of_token_blocks(lm_files, tmp_path, monkeypatch):
    from compress.quant.ptq_onnx import op_counts

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "blocks.npz", train=rng.integers(0, 300, (4, 17)), val=rng.integers(0, 300, (6, 17)))
    src = tmp_path / "lm.onnx"
    src.write_bytes(lm_files["lm"].read_bytes())
    res = CliRunner().invoke(cli, ["quantize", str(src), "--method", "lm_dynamic", "--data", str(tmp_path / "blocks.npz"),
                                   "--set", "check.max_ratio=2", "--no-latency"])
    assert res.exit_code == 0, res.output
    assert op_counts(tmp_path / "lm_int8.onnx")["MatMulInteger"] == 14  # default name: beside the input
    assert "perplexity check, 6 blocks" in res.output and "decode" not in res.output


@pytest.mark.parametrize("args,message", [
    (["lm.onnx"], "lm.onnx: a language model file with a key-value cache; --method ptq_static does not fit it: "
                  "use --method nbits (int4/int8 weight-only) or lm_dynamic (int8 dynamic MatMuls)"),
    (["tiny.onnx", "--method", "nbits"], "tiny.onnx: no key-value cache (no past_key_values.* inputs), so not a language "
                                         "model file for --method nbits; a float model file takes --method ptq_static"),
    (["lm.onnx", "--method", "nbits", "--samples", "8"], "--samples: nbits counts token blocks: --set check.blocks=N"),
])
def test_a_method_that_does_not_fit_the_file_is_one_line_exit_2(files, lm_files, monkeypatch, args, message):
    d = lm_files["dir"]
    if not (d / "tiny.onnx").exists():
        (d / "tiny.onnx").write_bytes(files["model"].read_bytes())
    monkeypatch.chdir(d)
    res = CliRunner().invoke(cli, ["quantize", *args, "--data", str(lm_files["recipe"]), "-o", "out.onnx"])
    lines = res.output.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {message}"), res.output
    assert not (d / "out.onnx").exists()
