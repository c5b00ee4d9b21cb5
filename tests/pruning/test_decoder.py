"""Minitron-style decoder pruning on tiny random-init LMs of every declared family: heads (GQA groups kept
consistent), MLP neurons, hidden size and layers go; the pruned model reloads with from_pretrained and from
a compress checkpoint; a hand-sliced reference and zeroed parts check the surgery and the importances."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn

from compress.checkpoint_io import model_state, restore
from compress.config import validate
from compress.errors import RecipeError, RecipeErrors
from compress.models.adapter import logits_of, wrap_io
from compress.models.decoder import decoder_layout
from compress.pruning.decoder import (DecoderPruneConfig, Plan, apply_plan, decoder_macs, hf_config, make_plan,
                                      prune_lm)
from compress.pruning.methods import PruneConfig

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)
FAMILIES = ("gpt2", "llama", "phi3", "qwen2", "qwen3")


def _config(family: str):
    """4 layers, 4 heads of 8 in 2 key-value groups (GPT-2: 4 groups of one), MLP 48 (GPT-2: 4 x 32), vocab 64."""
    if family == "gpt2":  # its own field names; tied embeddings
        return transformers.AutoConfig.for_model("gpt2", vocab_size=64, n_embd=32, n_layer=4, n_head=4, n_positions=64)
    return transformers.AutoConfig.for_model(family, **TINY, **{"qwen3": {"head_dim": 8}, "phi3": {"pad_token_id": 0}}.get(family, {}))


CUT = {"depth": 0.25, "heads": 0.5, "mlp": 0.5, "hidden": 0.5}


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.logging.set_verbosity_error()
        yield


def _model(family: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(_config(family)).eval()


def _batches(n=2, vocab=64, seq=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (2, seq), generator=g) for _ in range(n)]


def _logits(model, x):
    with torch.no_grad():
        return logits_of(model(x))


@pytest.mark.parametrize("family", FAMILIES)
def test_family_prunes_and_reloads(family, tmp_path):
    model = _model(family)
    unpruned = copy.deepcopy(model)
    batches = _batches()
    model, facts = prune_lm(model, {**CUT, "hidden": 0.0} if family == "gpt2" else CUT, batches)
    layout = decoder_layout(model)
    s = layout.sizes(model.config)
    # 4 -> 3 layers; 2 of 4 heads (GPT-2: one group per head; the others drop one of 2 key-value groups)
    assert s == {"layers": 3, "heads": 2, "kv_heads": 2 if family == "gpt2" else 1, "hidden": 16,
                 "intermediate": 64 if family == "gpt2" else 24, "head_dim": 8}
    assert s["heads"] % s["kv_heads"] == 0 and facts["params"] < facts["unpruned_params"] / 2.5
    for i, layer in enumerate(layout.decoder_layers(model)):
        attn = layer.get_submodule(layout.attn)
        assert attn.layer_idx == i
        assert getattr(attn, "num_key_value_groups", 1) == s["heads"] // s["kv_heads"]
    x = batches[0]
    out = _logits(model, x)
    assert out.shape == (2, 16, 64) and torch.isfinite(out).all()
    assert layout.tied(model) == layout.tied(unpruned)

    model.save_pretrained(tmp_path / "hf")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    assert torch.allclose(_logits(again, x), out, atol=1e-5)

    # a compress checkpoint: the unpruned architecture rebuilt, the recorded transform replayed, the weights loaded
    ckpt = model_state(model)
    assert [t["kind"] for t in ckpt["transforms"]] == ["decoder_prune"]
    fresh = transformers.AutoModelForCausalLM.from_config(_config(family)).eval()
    restored = restore(fresh, ckpt)
    assert torch.allclose(_logits(restored, x), out, atol=1e-5)
    with torch.device("meta"):  # load_model's dry run replays on the meta device first
        meta = transformers.AutoModelForCausalLM.from_config(_config(family))
        restore(meta, {**ckpt, "state_dict": {k: v.to("meta") for k, v in ckpt["state_dict"].items()}})


def test_wrapped_model_prunes_and_restores():
    bare = _model("llama")
    model = wrap_io(bare, None, decoder=decoder_layout(bare))
    x = _batches()[0]
    model, _ = prune_lm(model, CUT, [x])
    out = model(x)
    ckpt = model_state(model)
    fresh = transformers.AutoModelForCausalLM.from_config(_config("llama"))
    fresh = restore(wrap_io(fresh, None, decoder=decoder_layout(fresh)), ckpt).eval()
    assert torch.allclose(fresh(x), out, atol=1e-5)


def test_pruned_forward_equals_hand_sliced_reference():
    model = _model("llama")
    q, kv = torch.tensor([2, 3]), torch.tensor([1])  # group 1 and its two query heads (head_dim 8)
    neurons, hidden = torch.tensor([1, 5, 7, 30, 40]), torch.tensor(sorted(range(0, 32, 2)))
    plan = Plan([0, 2, 3], [q] * 3, [kv] * 3, [neurons] * 3, hidden)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    rows_q, rows_kv = torch.arange(16, 32), torch.arange(8, 16)
    cfg = transformers.LlamaConfig(**{**TINY, "num_hidden_layers": 3, "num_attention_heads": 2, "num_key_value_heads": 1,
                                      "intermediate_size": 5, "hidden_size": 16, "head_dim": 8})
    ref = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    want = {"model.embed_tokens.weight": sd["model.embed_tokens.weight"][:, hidden],
            "model.norm.weight": sd["model.norm.weight"][hidden], "lm_head.weight": sd["lm_head.weight"][:, hidden]}
    for new, old in enumerate([0, 2, 3]):
        p, n = f"model.layers.{old}.", f"model.layers.{new}."
        want |= {n + "self_attn.q_proj.weight": sd[p + "self_attn.q_proj.weight"][rows_q][:, hidden],
                 n + "self_attn.k_proj.weight": sd[p + "self_attn.k_proj.weight"][rows_kv][:, hidden],
                 n + "self_attn.v_proj.weight": sd[p + "self_attn.v_proj.weight"][rows_kv][:, hidden],
                 n + "self_attn.o_proj.weight": sd[p + "self_attn.o_proj.weight"][hidden][:, rows_q],
                 n + "mlp.gate_proj.weight": sd[p + "mlp.gate_proj.weight"][neurons][:, hidden],
                 n + "mlp.up_proj.weight": sd[p + "mlp.up_proj.weight"][neurons][:, hidden],
                 n + "mlp.down_proj.weight": sd[p + "mlp.down_proj.weight"][hidden][:, neurons],
                 n + "input_layernorm.weight": sd[p + "input_layernorm.weight"][hidden],
                 n + "post_attention_layernorm.weight": sd[p + "post_attention_layernorm.weight"][hidden]}
    ref.load_state_dict(want)
    apply_plan(model, decoder_layout(model), plan)
    x = _batches()[0]
    assert torch.allclose(_logits(model, x), _logits(ref, x), atol=1e-5)


@torch.no_grad()
def test_zero_importance_parts_go_without_changing_the_output():
    model = _model("llama")
    layers = model.model.layers
    for layer in layers:
        layer.self_attn.v_proj.weight[:8] = 0  # key-value group 0: its query heads 0 and 1 output zeros
        layer.mlp.up_proj.weight[:24] = 0  # neurons 0-23 output zeros
    layers[1].self_attn.o_proj.weight.zero_()  # layer 1 adds nothing to the residual stream
    layers[1].mlp.down_proj.weight.zero_()
    x = _batches()[0]
    before = _logits(model, x)
    cfg = {"depth": 0.25, "heads": 0.5, "mlp": 0.5, "hidden": 0.0, "depth_importance": "cosine"}
    model, facts = prune_lm(model, cfg, _batches())
    assert facts["layers_kept"] == [0, 2, 3]
    assert torch.allclose(_logits(model, x), before, atol=1e-5)


@torch.no_grad()
def test_within_groups_keeps_every_group():
    model = _model("llama")
    for layer in model.model.layers:  # heads 1 and 3 (one in each group) write nothing
        layer.self_attn.o_proj.weight[:, 8:16] = 0
        layer.self_attn.o_proj.weight[:, 24:32] = 0
    x = _batches()[0]
    before = _logits(model, x)
    cfg = {"heads": 0.5, "head_mode": "within", "mlp": 0.0, "hidden": 0.0, "importance": "magnitude"}
    model, _ = prune_lm(model, cfg, [x])
    s = decoder_layout(model).sizes(model.config)
    assert (s["heads"], s["kv_heads"]) == (2, 2) and model.model.layers[0].self_attn.num_key_value_groups == 1
    assert torch.allclose(_logits(model, x), before, atol=1e-5)


@pytest.mark.parametrize("kind", ["params", "macs"])
def test_budget_lands_within_five_percent(kind):
    cfg = transformers.LlamaConfig(**{**TINY, "hidden_size": 64, "intermediate_size": 128, "vocab_size": 128})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    batches = _batches(vocab=128)
    model, facts = prune_lm(model, {"depth": 0.25, "heads": 0.25, "mlp": 0.5, "hidden": 0.25,
                                    "budget": {"kind": kind, "reduction": 3}}, batches)
    ratio = facts[f"unpruned_{kind}"] / facts[kind]
    assert facts["budget_met"] and 3 <= ratio <= 3 * 1.05, ratio
    if kind == "macs":
        assert facts["macs"] == decoder_macs(model, decoder_layout(model), 16)


def test_exact_sizes():
    model, _ = prune_lm(_model("qwen2"), {"sizes": {"layers": 2, "heads": 2, "kv_heads": 1, "intermediate": 16,
                                                     "hidden": 24}}, _batches())
    c = model.config
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size, c.hidden_size,
            c.head_dim, len(c.layer_types)) == (2, 2, 1, 16, 24, 8, 2)
    assert _logits(model, _batches()[0]).shape == (2, 16, 64)


@pytest.mark.parametrize("family,cfg,key,words", [
    ("llama", {"sizes": {"heads": 8}}, "prune.sizes.heads", "asks for 8 heads; the model has 4"),
    ("llama", {"sizes": {"heads": 3}}, "prune.sizes.kv_heads", "heads must be a multiple of kv_heads"),
    ("gpt2", {"heads": 0.5, "hidden": 0, "head_mode": "within"}, "prune.head_mode", "one query head per group"),
    ("gpt2", {"heads": 0.5, "hidden": 0.25}, "prune.heads", "give one fraction"),
    ("llama", {"sizes": {"layers": 2}, "budget": {"kind": "params", "reduction": 2}}, "prune.sizes", "not both"),
    ("llama", {"budget": {"kind": "latency", "max": 5}}, "prune.budget.kind", "params or macs"),
])
def test_one_line_errors(family, cfg, key, words):
    with pytest.raises(RecipeError) as e:
        prune_lm(_model(family), cfg, _batches(1))
    assert str(e.value).startswith(key) and words in str(e.value) and "\n" not in str(e.value)


def test_config_errors_and_non_decoder_models():
    with pytest.raises(RecipeErrors) as e:
        validate(PruneConfig, {"method": "decoder", "importance": "activaton"}, "stages[1].prune")
    assert "stages[1].prune.importance" in str(e.value) and "did you mean 'activation'" in str(e.value)
    with pytest.raises(RecipeErrors, match="nothing to prune"):
        validate(PruneConfig, {"method": "decoder", "mlp": 0, "hidden": 0}, "prune")
    assert isinstance(PruneConfig(method="decoder", importance={"method": "random", "seed": 3}).importance.seed, int)
    with pytest.raises(RecipeError, match="prune.method: 'decoder' prunes decoder language models"):
        prune_lm(nn.Sequential(nn.Linear(4, 4)), {}, [torch.zeros(1, 4)])


def test_importances_rank_differently():
    from compress.pruning.decoder import LM_IMPORTANCES, LMImportanceConfig

    model, batches = _model("llama"), _batches()
    layout, sizes = decoder_layout(model), decoder_layout(model).sizes(model.config)
    target = {**sizes, "layers": 4, "intermediate": 12}
    picks = {}
    for name in LM_IMPORTANCES.names():
        width = LMImportanceConfig(method=name).scores(model, layout, batches)
        assert [len(n) for n in width.neurons] == [48] * 4 and len(width.hidden) == 32
        picks[name] = make_plan(layout, sizes, width, torch.zeros(4), target).neurons[0].tolist()
    assert len({tuple(p) for p in picks.values()}) == 3, picks


def test_prune_stage_on_lm_data_with_budget_gate_and_self_distillation(lm_corpus):
    """The stage on packed text blocks: token cross-entropy fine-tunes with token_kl self-distillation, the gate
    compares relative perplexity, MACs come from the decoder layout."""
    from compress.data import create_data
    from compress.models import create_model
    from compress.stages.prune import prune
    from tests.conftest import lm_data_spec

    data = create_data(lm_data_spec(lm_corpus))
    spec = {"name": "hf", "config": {**TINY, "model_type": "llama", "vocab_size": data.vocab_size}}
    model = create_model(spec, data.input_shape, data.num_outputs, data_task="lm")
    cfg = PruneConfig(method="decoder", depth=0.25, heads=0.5, depth_importance="cosine", calibration_batches=2,
                      budget={"kind": "params", "reduction": 2}, max_drop=0.9, finetune={"epochs": 1, "progress": False})
    model, metrics = prune(model, cfg, data)
    assert metrics["fine_tune"] == "self-distillation from the unpruned model" and metrics["kd_loss"] == "token_kl"
    assert 2 <= metrics["unpruned_params"] / metrics["params"] <= 2.1
    assert metrics["steps_done"] == 1 and len(metrics["steps"]) == 1  # the method lands the budget in its one step
    assert metrics["lm_sizes"]["heads"] % metrics["lm_sizes"]["kv_heads"] == 0
    assert [t["kind"] for t in model.compress_transforms] == ["decoder_prune"]
    assert hf_config(model).num_hidden_layers == len(model.model.model.layers)
    step, ref = metrics["steps"][0], metrics["unpruned_val_perplexity"]
    assert step["drop"] == pytest.approx((step["val_perplexity"] - ref) / ref)  # relative rise, not points
    assert metrics["macs"] == decoder_macs(model, decoder_layout(model), 16) < metrics["unpruned_macs"]


def test_steps_shrink_towards_the_final_sizes():
    from compress.pruning.decoder import DecoderPruner

    model, batches = _model("phi3"), _batches()
    pruner = DecoderPruner(DecoderPruneConfig(**CUT, sparsity=0.5, steps=2), model, batches)
    pruner.step(1, 0.25)
    half = dict(pruner.sizes)
    pruner.step(2, 0.5)
    one_shot, _ = prune_lm(_model("phi3"), CUT, batches)
    assert half == {"layers": 4, "heads": 4, "kv_heads": 2, "hidden": 24, "intermediate": 36, "head_dim": 8}
    assert pruner.sizes == decoder_layout(one_shot).sizes(one_shot.config)
    assert _logits(model, batches[0]).shape == (2, 16, 64)


@pytest.mark.parametrize("params,words", [
    ({"sizes": {"layers": 2, "heads": 99, "kv_heads": 1, "hidden": 16, "intermediate": 8, "head_dim": 8}, "layers": [0, 1]},
     "do not fit the model's"),
    ({"sizes": {"layers": 2, "heads": 2, "kv_heads": 1, "hidden": 16, "intermediate": 8, "head_dim": 8}, "layers": [0, 7]},
     "kept layers [0, 7] do not fit the model's 4 layers"),
])
def test_crafted_transform_is_one_line(params, words):
    _refused(params, words)


def test_a_gpt2_record_whose_hidden_is_not_heads_times_head_dim_is_refused():
    """from_pretrained would derive head_dim = hidden / heads: a different model than the one replayed."""
    params = {"sizes": {"layers": 4, "heads": 4, "kv_heads": 4, "hidden": 16, "intermediate": 64, "head_dim": 8},
              "layers": [0, 1, 2, 3]}
    _refused(params, "hidden must be heads x head_dim", family="gpt2")


def _refused(params, words, family="llama"):
    from compress.errors import CompressError

    ckpt = {"transforms": [{"kind": "decoder_prune", "params": params}], "state_dict": {}}
    with pytest.raises(CompressError) as e:
        restore(_model(family), ckpt, "m.pt")
    assert str(e.value).startswith("m.pt: recorded transform 0 (decoder_prune) does not apply") and words in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("extra", [{}, {"budget": {"kind": "params", "reduction": 2}}])
def test_multiple_of_rounds_mlp_and_hidden_down(extra):
    model, facts = prune_lm(_model("llama"), {"mlp": 0.3, "hidden": 0.3, "multiple_of": 8, **extra}, _batches())
    s = facts["lm_sizes"]
    assert s["intermediate"] % 8 == 0 and s["hidden"] % 8 == 0 and s["hidden"] < 32
    if not extra:
        assert (s["intermediate"], s["hidden"]) == (32, 16)  # 48 x 0.7 = 34 -> 32, 32 x 0.7 = 22 -> 16
    else:
        assert facts["budget_met"]
    assert _logits(model, _batches()[0]).shape == (2, 16, 64)
