"""timm: and hf: model sources (tiny configs, random init, offline) and their one-line errors."""
import os

import pytest
import torch

from compress.errors import RecipeError
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
