"""Tiny random-init decoder LMs of four families through a recipe: teacher -> distill into a narrower
student (a hidden-state hint between decoder layers) -> Minitron-style decoder pruning of half its layers,
key-value groups and MLP neurons (self-distilled from the unpruned student) -> int4 weight-only -> packed
.cpk; every row reloads from its file with the perplexity and MACs in the report."""
import pytest

from compress.checkpoint import load_model
from compress.data import create_data
from compress.errors import RecipeError
from compress.evaluation import evaluate
from compress.pruning.decoder import decoder_layout, decoder_macs, hf_config
from compress.pipeline import Pipeline
from tests.conftest import TINY_LM, lm_data_spec

pytest.importorskip("transformers")
FAST = {"epochs": 1, "progress": False, "optimizer": {"lr": 0.003}}
LAST = {  # each family ends with another PyTorch-side int4 method
    "llama": {"method": "gptq", "bits": 4, "group_size": 8, "calibration_batches": 4},
    "qwen2": {"method": "weight_only", "bits": 4, "group_size": 8},
    "phi3": {"method": "gptq", "bits": 4, "group_size": 8, "calibration_batches": 4},
    "gpt2": {"method": "qat", "bits": 4, "activation_bits": 0, "group_size": 8, "finetune": FAST},
}


def student_of(family: str, vocab: int) -> dict:
    """Narrower MLPs than the teacher, two layers and two key-value groups left for the prune stage to halve."""
    cfg = {**TINY_LM[family], "vocab_size": vocab}
    if family == "gpt2":
        return {**cfg, "n_inner": 64}
    return {**cfg, "intermediate_size": 32}


PRUNE = {"method": "decoder", "depth": 0.5, "heads": 0.5, "mlp": 0.5, "hidden": 0, "calibration_batches": 2,
         "finetune": FAST}


@pytest.mark.parametrize("family", sorted(LAST))
def test_distill_then_int4_and_reload(tmp_path, lm_corpus, family):
    data_spec = lm_data_spec(lm_corpus)
    vocab = create_data(data_spec).vocab_size
    recipe = {
        "name": f"lm_{family}", "seed": 0, "data": data_spec,
        "teacher": {"name": "hf", "config": {**TINY_LM[family], "vocab_size": vocab}},
        "model": {"name": "hf", "config": student_of(family, vocab)},
        "stages": [{"train": {"target": "teacher", **FAST}},
                   {"distill": {"temperature": 2, "alpha": 0.5, "hints": [{"student": 0, "teacher": 1}], **FAST}},
                   {"prune": PRUNE},
                   {"quantize": LAST[family]}, {"encode": {}}],
        "benchmark": {"latency": False},
    }
    rows = Pipeline.from_dict(recipe).run(tmp_path / "run")["stages"]
    assert [r["name"] for r in rows] == ["train", "distill", "prune", "quantize", "encode"]
    assert rows[1]["params"] < rows[0]["params"] and rows[1]["kd_loss"] == "token_kl"
    assert all(r["metrics"]["perplexity"] < vocab for r in rows)  # trained: better than uniform guessing
    pr = rows[2]
    assert pr["steps_done"] == 1 and pr["kd_loss"] == "token_kl", pr["stop_reason"]
    assert pr["fine_tune"] == "self-distillation from the unpruned model"
    heads = 2 if family == "gpt2" else 4  # GPT-2 has one query head per key-value group
    assert pr["lm_sizes"] == {**pr["lm_sizes_before"], "layers": 1, "kv_heads": pr["lm_sizes_before"]["kv_heads"] // 2,
                              "heads": heads // 2 if family != "gpt2" else 2,
                              "intermediate": pr["lm_sizes_before"]["intermediate"] // 2,
                              **({"hidden": 16} if family == "gpt2" else {})}
    assert rows[3]["quantized_layers"] == (4 if family in ("gpt2", "phi3") else 7)  # not head/embeddings
    assert rows[3]["size_bytes"] < rows[2]["size_bytes"] < rows[1]["size_bytes"]
    assert rows[4]["artifact"].endswith(".cpk")
    data = create_data(data_spec)
    x = data.example_input(1)
    for r in rows[1:]:
        model = load_model(r["artifact"])
        again = evaluate(model, data)
        assert again["perplexity"] == pytest.approx(r["metrics"]["perplexity"], rel=1e-5), r["name"]
        # MACs of the layout (count_macs misses GPT-2's Conv1D and the attention products)
        assert r["macs"] == decoder_macs(model, decoder_layout(model), x["input_ids"].shape[-1]) > 0, r["name"]
    pruned = load_model(pr["artifact"])
    assert hf_config(pruned).num_hidden_layers == 1 and pr["macs"] < pr["unpruned_macs"]


def test_teacher_with_another_tokenizer_is_one_line(tmp_path, lm_corpus):
    data_spec = lm_data_spec(lm_corpus)
    vocab = create_data(data_spec).vocab_size
    recipe = {"name": "bad", "data": data_spec,
              "teacher": {"name": "hf", "config": {**TINY_LM["llama"], "vocab_size": vocab + 8}},
              "model": {"name": "hf", "config": student_of("llama", vocab)},
              "stages": [{"distill": FAST}], "benchmark": {"latency": False}}
    with pytest.raises(RecipeError, match=r"stages\[0\].distill.teacher: .*must share the tokenizer"):
        Pipeline.from_dict(recipe).run(tmp_path / "run")
