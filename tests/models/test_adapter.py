"""The model I/O adapter: one declared head/first layer, dict inputs, logits, input adaptation, import:."""
import textwrap

import pytest
import torch
import torch.nn as nn
import yaml

from compress.data import create_data
from compress.data.inputs import Inputs
from compress.errors import RecipeError
from compress.models import create_model
from compress.models.adapter import IOModule, adapter_of, declare, head_name, logits_of, wrap_io
from compress.pruning.masks import classifier_name
from compress.quant.qat import quantizable_names


def test_undeclared_models_get_head_and_first_layer_by_order():
    m = create_model("lenet5", (1, 28, 28), 10)
    a = adapter_of(m)
    assert (a.first_layer, a.head) == ("features.0", "classifier.5")
    assert classifier_name(m) == a.head


def test_a_declared_head_is_the_one_answer_for_prune_qat_and_trainer():
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3), nn.Linear(3, 3))
    declare(m, head="2", first_layer="0")
    assert classifier_name(m) == "2" and head_name(m) == "2"
    assert quantizable_names(m, keep_first_last=True) == ["3"]


def test_a_head_that_does_not_exist_is_one_line():
    m = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(RecipeError, match="head: no module 'fc'"):
        head_name(m, "fc")


class Dicty(nn.Module):
    """Takes named inputs and returns a tuple, as many user and HF models do."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.fc = nn.Linear(4, 3)

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)
        if attention_mask is not None:
            h = h * attention_mask.unsqueeze(-1)
        return (self.fc(h.mean(1)), h)


def test_io_module_takes_dicts_and_returns_logits():
    m = wrap_io(Dicty(), ["input_ids", "attention_mask"], head="fc")
    x = Inputs(input_ids=torch.randint(0, 10, (2, 5)), attention_mask=torch.ones(2, 5))
    assert m(x).shape == (2, 3) and m(**x).shape == (2, 3)
    assert adapter_of(m).head == "model.fc" and adapter_of(m).inputs == ("input_ids", "attention_mask")
    with pytest.raises(TypeError, match="takes named inputs"):
        m(torch.zeros(2, 5))
    with pytest.raises(TypeError, match="one input tensor"):
        IOModule(nn.Linear(5, 3))(x)


def test_logits_of_reads_model_outputs():
    t = torch.ones(2, 3)

    class Out:
        logits = t

    assert logits_of(t) is t and logits_of(Out()) is t and logits_of({"logits": t}) is t and logits_of((t, 0)) is t
    with pytest.raises(TypeError):
        logits_of("nope")


def test_inputs_move_and_slice_like_a_tensor():
    x = Inputs(a=torch.zeros(4, 3), b=torch.ones(4, 3, dtype=torch.long))
    assert x[:2]["a"].shape == (2, 3) and x.shape == (4, 3) and x.to("cpu")["b"].dtype == torch.long


def test_torchvision_in_chans_and_adapt_input_reload_from_the_checkpoint(tmp_path):
    from compress.checkpoint import load_model, save_model

    x = torch.randn(2, 1, 28, 28)
    a = create_model({"name": "resnet18", "in_chans": 1}, (1, 28, 28), 10)
    assert a.conv1.in_channels == 1 and a(x).shape == (2, 10)
    b = create_model({"name": "resnet18", "adapt_input": {"channels": 3, "size": [32, 32]}}, (1, 28, 28), 10).eval()
    save_model(b, tmp_path / "b.pt")
    assert torch.allclose(load_model(tmp_path / "b.pt").eval()(x), b(x))


def test_import_resolves_from_the_recipe_folder_and_passes_shapes(tmp_path, monkeypatch, tiny_recipe):
    from compress.pipeline import Pipeline

    (tmp_path / "my_models_i17.py").write_text(textwrap.dedent("""
        import torch.nn as nn
        def net(input_shape, num_outputs, hidden=8):
            import math
            return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), hidden), nn.ReLU(),
                                 nn.Linear(hidden, num_outputs))
    """))
    doc = {**tiny_recipe, "model": {"import": "my_models_i17:net", "kwargs": {"hidden": 5},
                                    "adapter": {"head": "3"}}, "stages": [{"evaluate": {}}]}
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(doc))
    monkeypatch.chdir(tmp_path.parent)  # not the recipe's folder
    state = Pipeline.from_yaml(recipe).validate(allow_import=True)
    assert state.model[3].out_features == 3 and state.model[1].out_features == 5
    assert adapter_of(state.model).head == "3"
    doc["model"]["adapter"] = {"head": "fc"}
    recipe.write_text(yaml.safe_dump(doc))
    with pytest.raises(RecipeError, match="model.adapter.head: no module 'fc'"):
        Pipeline.from_yaml(recipe).validate(allow_import=True)


def test_dict_inputs_to_a_tensor_model_are_one_line():
    from compress.data import DataBundle
    from compress.stages.base import check_outputs
    from torch.utils.data import DataLoader

    rows = [(Inputs(input_ids=torch.randint(0, 10, (5,))), 0) for _ in range(4)]
    data = DataBundle.from_loaders(DataLoader(rows, batch_size=2), num_outputs=3)
    with pytest.raises(RecipeError, match=r"model: the model does not accept the data's named inputs \(input_ids\)"):
        check_outputs(nn.Linear(5, 3), data, "model")
    check_outputs(wrap_io(Dicty(), ["input_ids"]), data, "model")


def test_distill_from_user_loaders_says_why_the_cache_is_off():
    from compress import distill
    from compress.data import DataBundle
    from compress.stages.distill import DistillConfig

    d = create_data({"name": "synthetic", "num_samples": 64, "num_classes": 3, "shape": [4]})
    data = DataBundle.from_loaders(d.loader("train"), d.loader("val"))
    teacher = create_model("mlp", (4,), 3, hidden=[8])
    _, metrics = distill(create_model("mlp", (4,), 3, hidden=[4]), teacher,
                         DistillConfig(epochs=1, progress=False), data)
    assert metrics["teacher_cache"] is False and "user's DataLoader" in metrics["teacher_cache_off"]
