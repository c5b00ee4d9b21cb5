"""`name: hf` + config / `hf:<folder>` build a causal LM for lm data, declared through the adapter."""
import pytest
import torch

from compress.data import create_data
from compress.errors import RecipeError
from compress.models import create_model
from compress.models.adapter import adapter_of
from compress.models.decoder import LAYOUTS
from compress.stages.base import check_outputs
from tests.conftest import TINY_LM, lm_data_spec

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def data(lm_corpus):
    return create_data(lm_data_spec(lm_corpus))


def build(data, family, **config):
    spec = {"name": "hf", "config": {**TINY_LM[family], "vocab_size": data.vocab_size, **config}}
    return create_model(spec, data.input_shape, data.num_outputs, data_task=data.task)


@pytest.mark.parametrize("family", sorted(TINY_LM))
def test_families_build_from_a_recipe_spec(data, family):
    model = build(data, family)
    check_outputs(model, data, "model")
    a = adapter_of(model)
    assert model.compress_spec["task"] == "causal_lm"  # picked from the data, saved for reloading
    assert a.decoder == LAYOUTS[family].prefixed("model") and a.head == "model.lm_head"
    assert a.first_layer == f"model.{LAYOUTS[family].embed}" and a.inputs == ("input_ids",)
    assert model.model.config.use_cache is False
    x = data.example_input(2)
    assert model(x).shape == (2, 16, data.vocab_size)
    if family in ("llama", "qwen2"):  # grouped-query attention: k/v declare the key-value groups
        assert a.num_heads["model.model.layers.0.self_attn.k_proj"] == 2
        assert a.num_heads["model.model.layers.0.self_attn.q_proj"] == 4


def test_folder_with_weights_reloads(data, tmp_path):
    model = build(data, "llama")
    model.model.save_pretrained(tmp_path / "m")
    again = create_model({"name": f"hf:{tmp_path / 'm'}"}, data.input_shape, data.num_outputs, data_task="lm")
    x = data.example_input(1)
    assert torch.allclose(model.eval()(x), again.eval()(x))


def test_one_line_errors(data):
    with pytest.raises(RecipeError, match=r"model.config.vocab_size: .*embeds 100 tokens but the tokenizer"):
        check_outputs(build(data, "llama", vocab_size=100), data, "model")
    with pytest.raises(RecipeError, match=r"max_position_embeddings: .*8 positions but data.block_size is 16"):
        check_outputs(build(data, "llama", max_position_embeddings=8), data, "model")
    bert = {"model_type": "bert", "vocab_size": 300, "hidden_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 2, "intermediate_size": 32}
    with pytest.raises(RecipeError, match="no decoder family compress declares"):
        create_model({"name": "hf", "config": bert, "task": "causal_lm"}, (16,), 300)
    classifier = create_model({"name": "hf", "config": {**TINY_LM["llama"], "vocab_size": 300, "pad_token_id": 0}},
                              (16,), 300)  # not told the data is lm: a sequence classifier
    with pytest.raises(RecipeError, match="next-token logits"):
        check_outputs(classifier, data, "model")
