"""README "In your own training loop": its three examples run (plain PyTorch, Hugging Face, Lightning)."""
import importlib.util
import re
import warnings

import pytest


def _block(doc, marker):
    return re.search(rf"<!-- {marker} -->\s*```python\n(.*?)```", doc("README.md"), re.S).group(1)


def test_plain_loop_example_runs(doc, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(_block(doc, "loop-plain"), "README.md", "exec"), {})
    reduction, metrics = re.search(r"([\d.]+) (\{.*\})", capsys.readouterr().out).groups()
    assert float(reduction) > 1.5 and float(re.search(r"'accuracy': ([\d.]+)", metrics).group(1)) > 0.8
    assert (tmp_path / "student_int8.onnx").is_file()


def test_hf_example_runs_and_reloads(doc, tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    monkeypatch.chdir(tmp_path)
    warnings.simplefilter("ignore")
    exec(compile(_block(doc, "loop-hf"), "README.md", "exec"), {})
    again = transformers.BertForSequenceClassification.from_pretrained("hf-run/student", local_files_only=True)
    assert again.config.intermediate_size == 32 and again.bert.encoder.layer[1].intermediate.dense.out_features == 32


@pytest.mark.skipif(importlib.util.find_spec("pytorch_lightning") is None, reason="pip install 'compress[lightning]'")
def test_lightning_example_runs(doc, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    warnings.simplefilter("ignore")
    exec(compile(_block(doc, "loop-lightning"), "README.md", "exec"), {})
    assert float(re.search(r"'accuracy': ([\d.]+)", capsys.readouterr().out).group(1)) > 0.8
