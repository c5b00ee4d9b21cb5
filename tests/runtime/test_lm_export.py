"""Causal LMs as ONNX files with a key-value cache: parity with PyTorch on a prefill and 32 cached decode steps,
perplexity on a hand-checkable case, generation speed, and one-line errors."""
import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from compress.errors import CompressError
from compress.runtime.generate import generate, next_token, perplexity
from compress.runtime.lm_export import CacheShape, OrtLM, StepLM, export_lm, is_lm_file, past_names


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "phi3"])
def test_export_with_cache_matches_pytorch(family, tiny_lm, tmp_path):
    model = tiny_lm(family)
    path = export_lm(model, tmp_path / f"{family}.onnx")
    lm = OrtLM(path)
    assert lm.shape == CacheShape.of(model)
    assert lm.shape.kv_heads == (4 if family == "gpt2" else 2)  # grouped-query attention keeps 2 groups
    ids = np.random.default_rng(0).integers(0, 128, (2, 7))
    torch_logits, onnx_logits = [], []
    want = generate(model, ids, 32, logits_out=torch_logits)
    got = generate(lm, ids, 32, logits_out=onnx_logits)
    np.testing.assert_array_equal(got, want)  # greedy tokens identical for 32 steps
    assert len(set(want[0, 7:].tolist())) > 1  # the model says more than one token: the parity means something
    scale = max(float(np.abs(a).max()) for a in torch_logits)  # float32 rounding grows with the logits
    assert max(float(np.abs(a - b).max()) for a, b in zip(torch_logits, onnx_logits)) < 1e-5 * scale + 1e-5
    names = [i.name for i in onnx.load(str(path)).graph.input]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"] and names[3:] == past_names(2)
    assert is_lm_file(path)


def test_onnx_perplexity_matches_pytorch_and_batches(tiny_lm, tmp_path):
    model = tiny_lm("llama")
    path = export_lm(model, tmp_path / "m.onnx")
    blocks = generate(model, np.zeros((3, 1), np.int64), 15, temperature=1.0, seed=0)  # text the model likes
    ppl = perplexity(model, blocks)
    assert ppl == pytest.approx(perplexity(path, blocks, batch_size=2), rel=1e-5)
    assert ppl < 64  # well under the 128-token vocabulary: the blocks are the model's own text
    # a left-padded batch: the file honours the mask as PyTorch does (the tracer kept no all-ones shortcut)
    from compress.runtime.lm_export import TorchLM

    ids, mask = blocks[:2, :6], np.ones((2, 6), np.int64)
    mask[0, :2] = 0
    pos = np.clip(mask.cumsum(1) - 1, 0, None)
    lm = OrtLM(path)
    want, _ = TorchLM(model).step(ids, mask, pos, None)
    got, _ = lm.step(ids, mask, pos, lm.empty_cache(2))
    np.testing.assert_allclose(got[:, 2:], want[:, 2:], atol=1e-4)


class Uniform(StepLM):
    """Every token equally likely: perplexity is the vocabulary size, whatever the text."""

    runtime = "test"
    shape = CacheShape(1, 1, 1, 10)

    def empty_cache(self, batch):
        return None

    def step(self, ids, mask, positions, cache):
        return np.zeros((*ids.shape, 10), np.float32), None


def test_perplexity_by_hand():
    assert perplexity(Uniform(), np.arange(20).reshape(2, 10) % 10) == pytest.approx(10.0)
    # two equally likely tokens 0 and 1, the text always one of them: perplexity 2
    class Two(Uniform):
        def step(self, ids, mask, positions, cache):
            z = np.full((*ids.shape, 10), -np.inf, np.float32)
            z[..., :2] = 0
            return z, None

    assert perplexity(Two(), np.array([[0, 1, 1, 0, 1]])) == pytest.approx(2.0)


def test_sampling_is_seeded_and_top_k_bounds_it():
    logits = np.log(np.array([[0.5, 0.3, 0.1, 0.1]] * 200))
    a, b = (next_token(logits, 1.0, None, np.random.default_rng(3)) for _ in range(2))
    np.testing.assert_array_equal(a, b)
    assert set(next_token(logits, 1.0, 2, np.random.default_rng(0)).tolist()) == {0, 1}
    assert next_token(logits, 0.0).tolist() == [0] * 200


def _file(tmp_path, inputs, op="Identity", domain=""):
    nodes = [helper.make_node(op, [inputs[0]], ["logits"], domain=domain)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.INT64, ["b", "s"]) for n in inputs],
                              [helper.make_tensor_value_info("logits", TensorProto.INT64, ["b", "s"])])
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    path = tmp_path / "f.onnx"
    onnx.save(helper.make_model(graph, opset_imports=opsets), str(path))
    return path


def test_a_file_without_a_cache_is_one_line(tmp_path):
    path = _file(tmp_path, ["input_ids", "attention_mask"])
    with pytest.raises(CompressError, match="no key-value cache") as e:
        OrtLM(path)
    assert "\n" not in str(e.value) and not is_lm_file(path)
    with pytest.raises(CompressError, match="not a language model file"):
        OrtLM(_file(tmp_path, ["x"]))


def test_an_unsupported_op_is_one_line(tmp_path):
    path = _file(tmp_path, ["input_ids"], op="FancyAttention", domain="example.ops")
    with pytest.raises(CompressError, match="ONNX Runtime cannot load it") as e:
        OrtLM(path)
    assert "\n" not in str(e.value)


def test_generation_speed_interleaved_with_the_fp32_file(tiny_lm, tmp_path):
    from compress.measure.generation import format_generation, generation_columns, measure_generation

    model = tiny_lm("qwen2")
    path = export_lm(model, tmp_path / "m.onnx")
    speeds = measure_generation({"fp32": path, "eager": model}, baseline="fp32", batches=(1, 2), prompt_tokens=16,
                                runs=5, warmup=1)
    assert [(s.name, s.batch) for s in speeds] == [("fp32", 1), ("eager", 1), ("fp32", 2), ("eager", 2)]
    eager = speeds[1]
    assert eager.runtime == "pytorch" and eager.prefill_speedup > 0 and speeds[0].prefill_speedup is None
    assert speeds[2].decode_tokens_per_s == pytest.approx(2000 / speeds[2].decode_ms)
    assert math.isfinite(eager.decode_tokens_per_s)
    cols = generation_columns([s.as_dict() for s in speeds], batch=2)
    assert cols == {"prefill 16 tok (ms)": f"{speeds[2].prefill_ms:.2f}", "decode tok/s": f"{speeds[2].decode_tokens_per_s:.1f}"}
    assert "| eager | pytorch | 2 |" in format_generation(speeds)
