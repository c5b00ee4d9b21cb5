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
