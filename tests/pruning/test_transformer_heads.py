"""Transformer pruning through torch-pruning's num_heads: whole heads and MLP widths go, the pruned
model reloads from its checkpoint, and exports with named inputs and a dynamic sequence axis."""
import os
import warnings

import pytest
import torch
from torch.utils.data import DataLoader

from compress.checkpoint import load_model, save_model
from compress.data import DataBundle
from compress.data.inputs import Inputs
from compress.models import create_model
from compress.runtime.onnx import onnx_run, onnx_session, to_onnx
from compress.stages.prune import PruneConfig, prune

os.environ["HF_HUB_OFFLINE"] = "1"
BERT = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 64, "vocab_size": 100, "max_position_embeddings": 64}
CFG = PruneConfig(method="channel", sparsity=0.5, steps=1, finetune={"epochs": 1, "progress": False})


def _text_data():
    g = torch.Generator().manual_seed(0)
    rows = [(Inputs(input_ids=torch.randint(0, 100, (16,), generator=g), attention_mask=torch.ones(16, dtype=torch.long)),
             i % 3) for i in range(48)]
    return DataBundle.from_loaders(DataLoader(rows[:32], batch_size=16), DataLoader(rows[32:], batch_size=16),
                                   DataLoader(rows[32:], batch_size=16))


def _image_data():
    g = torch.Generator().manual_seed(0)
    rows = [(torch.randn(1, 28, 28, generator=g), i % 10) for i in range(48)]
    return DataBundle.from_loaders(DataLoader(rows[:32], batch_size=16), DataLoader(rows[32:], batch_size=16))


def _prune_reload(model, data, tmp_path):
    warnings.simplefilter("ignore")
    model, metrics = prune(model, CFG, data)
    save_model(model, tmp_path / "m.pt")
    again = load_model(tmp_path / "m.pt").eval()
    x = data.example_input(2)
    assert torch.allclose(again(x), model.eval()(x), atol=1e-5)
    return model, metrics


def test_timm_vit_loses_half_its_heads_and_reloads(tmp_path):
    pytest.importorskip("timm", reason="timm is the optional extra compress[timm]")
    spec = {"name": "timm:vit_tiny_patch16_224",
            "kwargs": {"img_size": 28, "patch_size": 7, "embed_dim": 48, "depth": 2, "num_heads": 4}}
    model, metrics = _prune_reload(create_model(spec, (1, 28, 28), 10), _image_data(), tmp_path)
    assert model.blocks[0].attn.num_heads == 2 and model.blocks[0].attn.qkv.out_features == 72
    assert model.patch_embed.proj.out_channels == 48  # the residual width is kept
    assert metrics["macs_reduction"] >= 1.5


def test_hf_bert_heads_pruned_and_exported_with_named_inputs(tmp_path):
    pytest.importorskip("transformers", reason="transformers is the optional extra compress[hf]")
    data = _text_data()
    model, metrics = _prune_reload(create_model({"name": "hf", "config": BERT}, (16,), 3), data, tmp_path)
    attn = model.model.bert.encoder.layer[0].attention.self
    assert attn.num_attention_heads == 2 and attn.query.out_features == 16
    x = data.example_input(4)
    to_onnx(model, x, tmp_path / "m.onnx")
    sess = onnx_session(tmp_path / "m.onnx")
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask"]
    short = Inputs({k: v[:, :8] for k, v in x.items()})  # the sequence axis is dynamic
    assert abs(onnx_run(sess, short) - model(short).detach().numpy()).max() < 1e-4


def test_torchvision_vit_keeps_its_attention_and_residual_width_and_prunes_mlps():
    """nn.MultiheadAttention fixes q/k/v to the residual width: it stays whole, the MLP hidden widths go."""
    from torchvision.models import VisionTransformer

    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    model = VisionTransformer(image_size=16, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=64,
                              num_classes=3)
    g = torch.Generator().manual_seed(0)
    rows = [(torch.randn(3, 16, 16, generator=g), i % 3) for i in range(32)]
    data = DataBundle.from_loaders(DataLoader(rows[:16], batch_size=8), DataLoader(rows[16:], batch_size=8), num_outputs=3)
    model, metrics = prune(model, CFG, data)
    assert model.conv_proj.out_channels == 16 and model.encoder.layers[0].self_attention.embed_dim == 16
    mlp = model.encoder.layers[0].mlp
    assert mlp[0].out_features <= 32 and mlp[3].in_features == mlp[0].out_features and mlp[3].out_features == 16
    assert model.eval()(data.example_input(2)).shape == (2, 3)
    assert metrics["macs_reduction"] > 1.2


def test_iterative_layer_scope_head_pruning_follows_the_schedule_of_the_initial_heads():
    """torch-pruning's layer scope applied each step's cumulative ratio to the heads left: 3 heads, 3 steps, none left."""
    pytest.importorskip("timm", reason="timm is the optional extra compress[timm]")
    warnings.simplefilter("ignore")
    spec = {"name": "timm:vit_tiny_patch16_224",
            "kwargs": {"img_size": 28, "patch_size": 7, "embed_dim": 48, "depth": 1, "num_heads": 3}}
    cfg = PruneConfig(method="channel", sparsity=0.6, steps=3, schedule="linear", scope="layer",
                      finetune={"epochs": 1, "progress": False})
    model, metrics = prune(create_model(spec, (1, 28, 28), 10), cfg, _image_data())
    assert metrics["steps_done"] == 3
    assert model.blocks[0].attn.num_heads == 1 and model.blocks[0].attn.qkv.out_features == 48  # round(3 x 0.4)


def test_pruning_a_vit_does_not_warn_about_its_position_embedding():
    pytest.importorskip("timm", reason="timm is the optional extra compress[timm]")
    spec = {"name": "timm:vit_tiny_patch16_224",
            "kwargs": {"img_size": 28, "patch_size": 7, "embed_dim": 48, "depth": 1, "num_heads": 4}}
    model = create_model(spec, (1, 28, 28), 10)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prune(model, CFG, _image_data())
    assert not [w for w in caught if "Unwrapped parameters" in str(w.message)]
