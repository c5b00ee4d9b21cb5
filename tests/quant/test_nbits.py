"""Weight-only int4/int8 ONNX files of a causal LM (ONNX Runtime's MatMulNBits) and int8 dynamic, each judged by
the perplexity of the file itself."""
import numpy as np
import pytest

from compress.config import validate
from compress.errors import CompressError, RecipeError
from compress.quant.methods.nbits import LMDynamicConfig, NBitsConfig
from compress.quant.nbits_onnx import lm_head_node, quantize_nbits
from compress.quant.ptq_onnx import op_counts
from compress.runtime.generate import onnx_perplexity, perplexity
from compress.runtime.lm_export import export_lm
from compress.stages.quantize import QuantizeConfig, check_config, quantize


def counting(n: int, rng) -> np.ndarray:
    """n blocks of 24 tokens counting up from a random start by a random step of 1-4 (mod 128)."""
    return (rng.integers(0, 128, (n, 1)) + rng.integers(1, 5, (n, 1)) * np.arange(24)) % 128


@pytest.fixture(scope="module")
def lm_file(tiny_lm, tmp_path_factory):
    """A tiny GPT-2 trained for 40 steps to count (~2 s): a random-init LM is chaotic, so any rounding of its
    weights moves its perplexity a lot; a trained one shows what int4 does to a model that has learnt something."""
    import torch

    model = tiny_lm("gpt2", init=0.02).train()
    opt, rng = torch.optim.Adam(model.parameters(), 1e-2), np.random.default_rng(0)
    for _ in range(40):
        x = torch.from_numpy(counting(16, rng))
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    path = export_lm(model, tmp_path_factory.mktemp("lm") / "gpt2.onnx")
    blocks = counting(12, np.random.default_rng(1))
    return model, path, {"train": blocks[:4], "val": blocks[4:8], "test": blocks[8:]}


def test_int4_rtn_file_runs_and_keeps_perplexity(lm_file, tmp_path):
    model, path, data = lm_file
    out = quantize_nbits(path, tmp_path / "int4.onnx", bits=4, block_size=32, accuracy_level=4)
    ops = op_counts(out)
    assert ops["MatMulNBits"] == 8  # 2 layers x (qkv, o, fc, proj); the LM head stays float
    graph_head = lm_head_node(__import__("onnx").load(str(out)).graph)
    assert graph_head is not None  # still a float MatMul
    ref, got = perplexity(model, data["test"]), onnx_perplexity(out, data["test"])
    assert got != pytest.approx(ref, rel=1e-6)  # the weights did change
    assert got == pytest.approx(ref, rel=0.03)  # ... and the file predicts as well
    assert ref < 10  # of 128 tokens: the model has learnt to count
    assert out.stat().st_size < path.stat().st_size
    from compress.measure.size import onnx_weights

    (p32, _, b32), (p4, _, b4) = onnx_weights(path), onnx_weights(out)
    assert p4 == p32 and b4 < b32 / 2  # two int4 weights a byte count as two parameters


def test_the_method_checks_perplexity_and_reports_the_file(lm_file, tmp_path):
    _, path, data = lm_file
    r = quantize(path, NBitsConfig(algorithm="gptq", lm_head=True, calibration={"blocks": 2}), data, out_dir=tmp_path)
    assert r.metrics["ops"]["MatMulNBits"] == 9 and r.metrics["calibration_blocks"] == 2
    check = r.metrics["perplexity_check"]
    assert check["blocks"] == 4 and check["ratio"] == pytest.approx(check["perplexity"] / check["float_perplexity"], rel=1e-3)
    assert r.metrics["perplexity"] == pytest.approx(r.metrics["fp32_onnx_metrics"]["perplexity"], rel=0.05)
    d = quantize(path, LMDynamicConfig(), data, out_dir=tmp_path)
    assert d.metrics["ops"]["MatMulInteger"] == 8 and d.metrics["bits"] == 8
    with pytest.raises(CompressError, match=r"perplexity .* \(check.max_ratio 1.0\); the file was not kept"):
        quantize(path, NBitsConfig(bits=4, block_size=256, symmetric=True, lm_head=True, embeddings=True,
                                   check={"max_ratio": 1.0}), data, out_dir=tmp_path)
    assert list(tmp_path.glob("*.rejected.onnx"))


def test_config_rules_are_one_line():
    assert isinstance(validate(QuantizeConfig, {"method": "nbits"}, "quantize"), NBitsConfig)
    with pytest.raises(RecipeError, match=r"quantize.algorithm: gptq writes 4-bit weights only"):
        check_config(NBitsConfig(algorithm="gptq", bits=8), "quantize")
    with pytest.raises(RecipeError, match=r"quantize.embeddings: quantized embeddings need"):
        check_config(NBitsConfig(algorithm="hqq", embeddings=True), "quantize")
    with pytest.raises(RecipeError, match=r"quantize.bits"):
        check_config(LMDynamicConfig(bits=4), "quantize")


def test_a_file_without_a_cache_is_refused(tmp_path):
    import torch

    from compress.runtime.onnx import to_onnx

    src = to_onnx(torch.nn.Linear(4, 2), torch.zeros(1, 4), tmp_path / "plain.onnx")
    with pytest.raises(CompressError, match="not a language model file"):
        quantize(src, NBitsConfig(), {"val": np.zeros((1, 4), np.int64)}, out_dir=tmp_path)


def test_lm_data_and_a_recipe_model(lm_corpus, tmp_path):
    """The lm dataset and a `name: hf` causal LM (compress-wrapped): the file's perplexity is the metric's."""
    from compress.data import create_data
    from compress.evaluation import evaluate
    from compress.models import create_model
    from compress.runtime.generate import lm_blocks
    from tests.conftest import TINY_LM, lm_data_spec

    data = create_data(lm_data_spec(lm_corpus))
    model = create_model({"name": "hf", "config": {**TINY_LM["llama"], "vocab_size": data.vocab_size}},
                         data.input_shape, data.num_outputs, data_task=data.task)
    blocks = lm_blocks(data, "test", 10 ** 9)
    assert blocks.shape[1] == 17  # 16 inputs and the last target: every target token is predicted
    metric = evaluate(model, data, "test")["perplexity"]
    assert perplexity(model, blocks) == pytest.approx(metric, rel=1e-5)
    r = quantize(model, NBitsConfig(check={"max_ratio": 1.5}), data, out_dir=tmp_path, split="test")
    assert r.metrics["perplexity"] == pytest.approx(metric, rel=0.1)
    assert r.metrics["fp32_onnx_metrics"]["perplexity"] == pytest.approx(metric, rel=1e-4)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_fuse_runs_ort_norm_fusions_and_keeps_logits(family, tiny_lm, tmp_path):
    """ONNX Runtime's transformer optimizer before MatMulNBits: fewer nodes, the cache interface kept, the same
    logits on a batch-2 prefill and decode steps as the unfused int4 file (float activations: exact math)."""
    from compress.runtime.generate import generate
    from compress.runtime.lm_export import OrtLM

    src = export_lm(tiny_lm(family).eval(), tmp_path / "fp32.onnx")
    plain = quantize_nbits(src, tmp_path / "plain.onnx", block_size=16)
    fused = quantize_nbits(src, tmp_path / "fused.onnx", block_size=16, fuse=True)
    a, b = op_counts(plain), op_counts(fused)
    assert sum(b.values()) < sum(a.values()) and b["MatMulNBits"] == a["MatMulNBits"]
    assert b.get("SkipSimplifiedLayerNormalization" if family == "llama" else "SkipLayerNormalization", 0) >= 2
    ids = np.random.default_rng(0).integers(0, OrtLM(src).shape.vocab, (2, 5))
    pa, pb = OrtLM(plain), OrtLM(fused)
    la, ca = pa.step(ids, np.ones((2, 5), np.int64), np.tile(np.arange(5), (2, 1)), pa.empty_cache(2))
    lb, cb = pb.step(ids, np.ones((2, 5), np.int64), np.tile(np.arange(5), (2, 1)), pb.empty_cache(2))
    np.testing.assert_allclose(lb, la, atol=1e-4 * np.abs(la).max())
    tok = la[:, -1:].argmax(-1)
    la, _ = pa.step(tok, np.ones((2, 6), np.int64), np.full((2, 1), 5), ca)
    lb, _ = pb.step(tok, np.ones((2, 6), np.int64), np.full((2, 1), 5), cb)
    np.testing.assert_allclose(lb, la, atol=1e-4 * np.abs(la).max())
    assert (generate(fused, ids[:1], 8) == generate(plain, ids[:1], 8)).all()
