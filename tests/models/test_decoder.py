"""Every declared decoder family's layout names real modules of a tiny random-init model."""
import pytest
import torch.nn as nn

from compress.models.adapter import adapter_of, wrap_io
from compress.models.decoder import LAYOUTS, decoder_layout

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**TINY),
    "mistral": lambda: transformers.MistralConfig(**TINY),
    "qwen2": lambda: transformers.Qwen2Config(**TINY),
    "qwen3": lambda: transformers.Qwen3Config(**TINY, head_dim=8),
    "phi3": lambda: transformers.Phi3Config(**TINY, pad_token_id=0),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64),
}


def test_every_family_has_a_tiny_config():
    assert set(CONFIGS) == set(LAYOUTS)


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_layout_names_real_modules(family):
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[family]())
    layout = decoder_layout(model)
    assert layout is LAYOUTS[family]
    sizes = layout.sizes(model.config)
    assert sizes["layers"] == len(layout.decoder_layers(model)) == 2
    assert sizes["heads"] == 4 and sizes["kv_heads"] == (4 if family == "gpt2" else 2)
    out = {"q": sizes["heads"], "k": sizes["kv_heads"], "v": sizes["kv_heads"]}
    layer = layout.decoder_layers(model)[0]
    for part, heads in out.items():
        m = layout.part(layer, layout.attn, getattr(layout, part))
        if m is not None:
            assert m.out_features == heads * sizes["head_dim"]
    fused = layout.part(layer, layout.attn, layout.qkv)
    if fused is not None:
        width = fused.weight.shape[1] if layout.conv1d else fused.out_features
        assert width == (sizes["heads"] + 2 * sizes["kv_heads"]) * sizes["head_dim"]
    down = layout.part(layer, layout.mlp, layout.down)
    assert (down.weight.shape[0] if layout.conv1d else down.in_features) == sizes["intermediate"]
    modules = dict(model.named_modules())
    assert all(n in modules for n in layout.linear_names(model))
    assert layout.lm_head not in layout.linear_names(model)
    assert isinstance(model.get_submodule(layout.embed), nn.Embedding)
    assert layout.tied(model) == bool(getattr(model.config, "tie_word_embeddings", False))


def test_wrapped_model_gets_prefixed_layout():
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS["llama"]())
    wrapped = wrap_io(model, ["input_ids"], decoder=decoder_layout(model))
    layout = decoder_layout(wrapped)
    assert adapter_of(wrapped).decoder is layout and layout.layers == "model.model.layers"
    assert len(layout.decoder_layers(wrapped)) == 2 and layout.tied(wrapped) == decoder_layout(model).tied(model)
