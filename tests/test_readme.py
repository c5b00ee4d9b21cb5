"""The README's promises: its Python API example runs, and its example recipe is valid."""
import re
from pathlib import Path

import pytest
import yaml

from compress.recipe import parse_recipe

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_api_example_runs(tmp_path, monkeypatch, capsys):
    block = re.search(r"<!-- readme-api-example -->\s*```python\n(.*?)```", README, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md", "exec"), {})
    out = capsys.readouterr().out
    accuracy = float(re.search(r"int8 student: ([\d.]+)% test accuracy", out).group(1))
    assert accuracy > 80  # ten classes: chance is 10%
    assert (tmp_path / "runs/api-demo/report.json").is_file()


def test_example_recipe_is_valid(tmp_path, monkeypatch):
    text = re.search(r"## A recipe\s*```yaml\n(.*?)```", README, re.S).group(1)
    monkeypatch.setenv("COMPRESS_DATA_DIR", str(tmp_path))
    (tmp_path / "mnist-t10k").mkdir()
    recipe = parse_recipe(yaml.safe_load(text))
    assert [s.name for s in recipe.stages] == ["train", "distill", "prune", "export", "quantize"]
    with pytest.raises(Exception, match=r"stages\[4\].prune: needs a float PyTorch model"):
        parse_recipe(yaml.safe_load(text), ["stages=" + repr([{"train": {}}, {"distill": {}}, {"export": {}},
                                                              {"quantize": {}}, {"prune": {}}])])


def test_extension_examples_register_and_run():
    """The 'Layout and development' snippets are real: each registers, and the quantization method runs."""
    import torch

    from compress import QuantizeConfig, create_data, create_model, quantize
    from compress.kd.losses import KD_LOSSES
    from compress.pruning.structured import IMPORTANCES
    from compress.quant.methods import QUANT_METHODS
    from compress.runtime.backends import BACKENDS

    section = README[README.index("## Layout and development"):]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 4
    added = [(QUANT_METHODS, "fp16"), (IMPORTANCES, "l1_mean"), (KD_LOSSES, "cosine_logits"), (BACKENDS, "openvino")]
    try:
        for block in blocks:
            exec(compile(block, "README.md", "exec"), {})
        assert all(name in reg.names() for reg, name in added)
        data = create_data({"name": "synthetic", "num_samples": 64, "num_classes": 3, "shape": [4], "batch_size": 16})
        model = create_model("mlp", data.input_shape, data.num_outputs, hidden=[8])
        out, m = quantize(model, QuantizeConfig(method="fp16"), data)
        assert m["method"] == "fp16" and 0 <= m["accuracy"] <= 1
        assert KD_LOSSES.get("cosine_logits").obj(torch.ones(2, 3), torch.ones(2, 3), 1.0).item() == pytest.approx(0, abs=1e-6)
    finally:
        for reg, name in added:
            reg._entries.pop(name, None)


def test_your_models_recipe_is_valid():
    """The 'Your models' recipe: a torchvision teacher hints a timm ViT student across layouts."""
    section = README[README.index("## Your models"):README.index("## Runs, checkpoints, resume")]
    text = re.search(r"```yaml\n(name: .*?)```", section, re.S).group(1)
    recipe = parse_recipe(yaml.safe_load(text))
    assert [s.name for s in recipe.stages] == ["train", "distill", "prune", "export", "quantize"]
    assert recipe.model.name.startswith("timm:") and recipe.stages[1].config.hints[0].teacher == "layer4"
