"""ORT's pre-processing leaves nothing in the user's working directory, even when its symbolic shape
inference gives up (it then writes a temp model and a ``<uuid>.data`` file into the current folder), and
static int8 of a transformer does not flood the log with ORT's per-channel fallback notes."""
import os

import pytest
import torch

from compress.data.inputs import Inputs
from compress.models import create_model
from compress.quant.ptq_onnx import _preprocess
from compress.runtime.onnx import to_onnx

os.environ["HF_HUB_OFFLINE"] = "1"
BERT = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
        "intermediate_size": 32, "vocab_size": 50, "max_position_embeddings": 32}


def test_preprocess_of_a_bert_writes_nothing_into_the_working_directory(tmp_path, monkeypatch):
    pytest.importorskip("transformers", reason="transformers is the optional extra compress[hf]")
    model = create_model({"name": "hf", "config": BERT}, (8,), 2)
    x = Inputs(input_ids=torch.randint(0, 50, (2, 8)), attention_mask=torch.ones(2, 8, dtype=torch.long))
    out = tmp_path / "out"
    out.mkdir()
    src = to_onnx(model, x, out / "m.onnx")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    done = _preprocess(src, out / "m_pre.onnx")
    assert list(cwd.iterdir()) == []
    assert done.is_file() and done.parent == out


def test_static_int8_of_a_vit_does_not_log_orts_per_channel_fallback(tmp_path, caplog):
    pytest.importorskip("timm", reason="timm is the optional extra compress[timm]")
    from compress.data import create_data
    from compress.stages.quantize import QuantizeConfig, quantize

    data = create_data({"name": "synthetic", "num_samples": 16, "num_classes": 3, "shape": [3, 16, 16]})
    model = create_model({"name": "timm:vit_tiny_patch16_224", "kwargs": {"img_size": 16, "patch_size": 8,
                                                                          "embed_dim": 16, "depth": 1, "num_heads": 2}},
                         (3, 16, 16), 3)
    cfg = QuantizeConfig(method="ptq_static", calibration={"batches": 1},
                         check={"max_rel_diff": 2.0, "min_top1_agreement": 0.0, "max_kernel_diff": 1.0})
    quantize(model, cfg, data, out_dir=tmp_path)
    assert not [r for r in caplog.records if "out-of-range for weight" in r.getMessage()]


def test_preprocess_runs_orts_tools_away_from_the_working_directory(tmp_path, monkeypatch):
    """Whatever ORT's pre-processing drops into the current folder before failing stays out of the user's
    (a stand-in for its symbolic shape inference, independent of whether a given ORT version gives up)."""
    import onnxruntime.quantization.shape_inference as si

    calls = []

    def litters(src, dst, skip_symbolic_shape=False, **_):
        calls.append(skip_symbolic_shape)
        open("sym_shape_infer_temp.onnx", "wb").close()
        if not skip_symbolic_shape:
            raise RuntimeError("Incomplete symbolic shape inference")
        open(dst, "wb").close()

    monkeypatch.setattr(si, "quant_pre_process", litters)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.onnx").write_bytes(b"")
    assert _preprocess(tmp_path / "m.onnx", tmp_path / "m_pre.onnx") == tmp_path / "m_pre.onnx"
    assert calls == [False, True] and sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m_pre.onnx"]
