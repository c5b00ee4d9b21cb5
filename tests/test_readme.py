"""The documentation's promises (README.md and docs/*.md): its Python examples run, its recipes are valid."""
import re
from pathlib import Path

import pytest
import yaml

from compress.recipe import parse_recipe, read_yaml


def test_readme_api_example_runs(doc, tmp_path, monkeypatch, capsys):
    """The README's Python example: train, distill, channel-prune and int8 in a few lines."""
    block = re.search(r"<!-- readme-api-short -->\s*```python\n(.*?)```", doc("README.md"), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md", "exec"), {})
    accuracy = float(re.search(r"int8 student: ([\d.]+)% test accuracy", capsys.readouterr().out).group(1))
    assert accuracy > 80  # ten classes: chance is 10%


def test_api_example_runs(doc, tmp_path, monkeypatch, capsys):
    """docs/api.md: your own loaders and models through every stage, then a whole recipe from code."""
    block = re.search(r"<!-- readme-api-example -->\s*```python\n(.*?)```", doc("api.md"), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "docs/api.md", "exec"), {})
    out = capsys.readouterr().out
    accuracy = float(re.search(r"int8 student: ([\d.]+)% test accuracy", out).group(1))
    assert accuracy > 80  # ten classes: chance is 10%
    assert (tmp_path / "runs/api-demo/report.json").is_file()


def test_example_recipe_is_valid(doc, tmp_path, monkeypatch):
    text = re.search(r"## A recipe\s*```yaml\n(.*?)```", doc("recipes.md"), re.S).group(1)
    monkeypatch.setenv("COMPRESS_DATA_DIR", str(tmp_path))
    (tmp_path / "mnist-t10k").mkdir()
    recipe = parse_recipe(yaml.safe_load(text))
    assert [s.name for s in recipe.stages] == ["train", "distill", "prune", "export", "quantize"]
    with pytest.raises(Exception, match=r"stages\[4\].prune: needs a float PyTorch model"):
        parse_recipe(yaml.safe_load(text), ["stages=" + repr([{"train": {}}, {"distill": {}}, {"export": {}},
                                                              {"quantize": {}}, {"prune": {}}])])


def test_extension_examples_register_and_run(doc):
    """docs/development.md's extension snippets are real: each registers, and the quantization method runs."""
    import torch

    from compress import QuantizeConfig, create_data, create_model, quantize
    from compress.kd.losses import KD_LOSSES
    from compress.pruning.structured import IMPORTANCES
    from compress.quant.methods import QUANT_METHODS
    from compress.runtime.backends import BACKENDS

    blocks = re.findall(r"```python\n(.*?)```", doc("development.md", "## Layout and development"), re.S)
    assert len(blocks) == 4
    added = [(QUANT_METHODS, "fp16"), (IMPORTANCES, "l1_mean"), (KD_LOSSES, "cosine_logits"), (BACKENDS, "openvino")]
    try:
        for block in blocks:
            exec(compile(block, "docs/development.md", "exec"), {})
        assert all(name in reg.names() for reg, name in added)
        data = create_data({"name": "synthetic", "num_samples": 64, "num_classes": 3, "shape": [4], "batch_size": 16})
        model = create_model("mlp", data.input_shape, data.num_outputs, hidden=[8])
        out, m = quantize(model, QuantizeConfig(method="fp16"), data)
        assert m["method"] == "fp16" and 0 <= m["accuracy"] <= 1
        assert KD_LOSSES.get("cosine_logits").obj(torch.ones(2, 3), torch.ones(2, 3), 1.0).item() == pytest.approx(0, abs=1e-6)
    finally:
        for reg, name in added:
            reg._entries.pop(name, None)


def test_your_models_recipe_is_valid(doc):
    """docs/recipes.md's 'Your models' recipe: a torchvision teacher hints a timm ViT student across layouts."""
    text = re.search(r"```yaml\n(name: .*?)```", doc("recipes.md", "## Your models"), re.S).group(1)
    recipe = parse_recipe(yaml.safe_load(text))
    assert [s.name for s in recipe.stages] == ["train", "distill", "prune", "export", "quantize"]
    assert recipe.model.name.startswith("timm:") and recipe.stages[1].config.hints[0].teacher == "layer4"


def test_readme_quickstart_is_the_recipe(doc):
    """The README's abridged quickstart says what recipes/quickstart.yaml does: its stages, in order, with
    every setting shown as the file has it."""
    def shown_in(shown, actual):
        if isinstance(shown, dict):
            return isinstance(actual, dict) and all(k in actual and shown_in(v, actual[k]) for k, v in shown.items())
        return shown == actual

    text = re.search(r"```yaml\n(# recipes/quickstart.yaml.*?)```", doc("README.md", "## Quickstart"), re.S).group(1)
    readme = yaml.safe_load(text)["stages"]
    recipe = read_yaml(Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml")["stages"]
    assert [list(s) for s in readme] == [list(s) for s in recipe]
    for shown, actual in zip(readme, recipe):
        assert shown_in(shown, actual), (shown, actual)
