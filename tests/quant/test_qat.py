"""QAT layers: BN folding, packed checkpoints that reload exactly, int8 QDQ export that ORT runs as int8."""

import numpy as np
import pytest
import torch
import torch.nn as nn

from compress import create_data, create_model, load_model, save_model
from compress.checkpoint import record_transform
from compress.runtime.onnx import OrtModel, onnx_run, onnx_session
from compress.quant.int8 import saturation_risk
from compress.quant.ptq_onnx import op_counts
from compress.quant.qat import (QuantLayer, calibrate, fold_batchnorm, pack_model, quant_layers, quantizable_names,
                                wrap)
from compress.quant.qat import export_qdq

SPEC8 = {"kind": "int", "bits": 8, "act_bits": 8, "act_mode": "ema", "out_quant": True}


@pytest.fixture(scope="module")
def data():
    return create_data({"name": "synthetic", "num_samples": 128, "num_classes": 3, "shape": [1, 8, 8], "batch_size": 32})


def cnn(data, seed=0):
    torch.manual_seed(seed)
    model = create_model({"name": "smallcnn", "widths": [4, 8]}, data.input_shape, data.num_outputs)
    with torch.no_grad():  # non-trivial BN statistics so folding has something to fold
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
    return model.eval()


def quantized(data, spec, seed=0):
    model = cnn(data, seed)
    pairs = fold_batchnorm(model)
    record_transform(model, "fold_bn", pairs=pairs)
    layers = {n: spec for n in quantizable_names(model, keep_first_last=False)}
    wrap(model, layers)
    calibrate(model, data.loader("train"), 2)
    model.eval()
    pack_model(model)
    record_transform(model, "qat", layers=layers)
    return model


def test_fold_batchnorm_keeps_outputs_and_reloads(data, tmp_path):
    model = cnn(data)
    x = data.example_input(8)
    before = model(x)
    pairs = fold_batchnorm(model)
    assert len(pairs) == 2 and not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert torch.allclose(model(x), before, atol=1e-5)
    record_transform(model, "fold_bn", pairs=pairs)
    again = load_model(save_model(model, tmp_path / "m.pt"))
    assert torch.allclose(again(x), before, atol=1e-5)


@pytest.mark.parametrize("spec", [
    {"kind": "int", "bits": 4, "act_bits": 4, "act_mode": "lsq", "learned_scale": True},
    {"kind": "int", "bits": 2, "act_bits": 0},
    {"kind": "binary", "bits": 1, "binary": "xnor", "scale_mode": "channel"},
])
def test_packed_checkpoint_reloads_exactly_and_shrinks(data, tmp_path, spec):
    model = quantized(data, spec)
    assert all(m.packed and m.inner.weight is None for m in quant_layers(model))
    x = data.example_input(8)
    path = save_model(model, tmp_path / "q.pt")
    again = load_model(path).eval()
    assert torch.equal(again(x), model(x))
    bits = spec["bits"]
    for m in quant_layers(again):
        n = int(np.prod(m.weight_shape))
        assert m.weight_packed.dtype == torch.uint8 and m.weight_packed.numel() == -(-n * bits // 8)


def test_packed_weights_equal_the_fake_quantized_ones(data):
    model = cnn(data)
    fold_batchnorm(model)
    wrap(model, {n: {"kind": "int", "bits": 4} for n in quantizable_names(model, False)})
    model.eval()
    x = data.example_input(4)
    before = model(x)
    pack_model(model)
    assert torch.allclose(model(x), before, atol=1e-5)


# The two int8 files that are right on every x86 CPU (compress.quant.int8): 7-bit-range int8 weights
# (trained on that grid), or full 8-bit weights stored as uint8.
PORTABLE = {"int8-7bit": ({**SPEC8, "range_bits": 7}, "int8"), "uint8": (SPEC8, "uint8")}


@pytest.mark.parametrize("kind", list(PORTABLE))
def test_int8_qat_export_runs_as_int8_in_onnx_runtime_and_matches_pytorch(data, tmp_path, kind):
    spec, weight_type = PORTABLE[kind]
    model = quantized(data, spec)
    path = export_qdq(model, data.example_input(1), tmp_path / "qat.onnx", weight_type=weight_type)
    assert saturation_risk(path) == []  # so ORT's int8 kernels compute it alike with or without VNNI
    ops = op_counts(path)
    assert ops.get("DequantizeLinear", 0) >= 4
    fused = op_counts(path, optimized=True)
    assert fused.get("QLinearConv", 0) == 2  # ORT fused Q/DQ + Conv into int8 kernels
    x = torch.cat([data.example_input(64)])
    ref, got = model(x).detach(), OrtModel(path)(x)
    # Stated tolerance: ORT requantizes in integer arithmetic, PyTorch simulates it in float, so a
    # value may land one int8 step apart; logits stay within 2 output steps and the class agrees.
    step = float(quant_layers(model)[-1].out_q.scale)
    assert (ref - got).abs().max() <= 2 * step + 1e-6
    assert (ref.argmax(1) == got.argmax(1)).float().mean() >= 0.98


def test_full_range_int8_weights_are_flagged_and_uint8_storage_is_exact(data, tmp_path):
    """Full 8-bit int8 weights can saturate U8S8 kernels without VNNI; stored as uint8 they compute the same."""
    model = quantized(data, SPEC8)
    risky = export_qdq(model, data.example_input(1), tmp_path / "s8.onnx")
    assert saturation_risk(risky)  # the check must be able to fail
    safe = export_qdq(model, data.example_input(1), tmp_path / "u8.onnx", weight_type="uint8")
    assert saturation_risk(safe) == []
    x = data.example_input(64)
    # ORT's float simulation (no int8 kernels): the two files mean exactly the same numbers.
    a = onnx_run(onnx_session(risky, optimize=False), x)
    b = onnx_run(onnx_session(safe, optimize=False), x)
    assert np.array_equal(a, b)


def test_wrap_targets_only_conv_and_linear_and_keep_first_last(data):
    model = create_model("lenet5", data.input_shape, data.num_outputs)
    names = quantizable_names(model, keep_first_last=True)
    assert names == ["features.3", "classifier.1", "classifier.3"]
    wrap(model, {n: {"kind": "binary", "bits": 1, "binary": "binaryconnect"} for n in names})
    assert isinstance(model.features[3], QuantLayer) and isinstance(model.features[0], nn.Conv2d)


def test_unpacked_int8_model_exports_too_and_leaves_no_trace(data, tmp_path):
    model = cnn(data)
    fold_batchnorm(model)
    wrap(model, {n: SPEC8 for n in quantizable_names(model, False)})
    calibrate(model, data.loader("train"), 2)
    model.eval()
    x = data.example_input(16)
    ref = model(x).detach()
    path = export_qdq(model, data.example_input(1), tmp_path / "unpacked.onnx")
    assert not any(hasattr(m, "weight_scale") for m in quant_layers(model))
    assert (OrtModel(path)(x).argmax(1) == ref.argmax(1)).float().mean() >= 0.9


@pytest.mark.parametrize("spec", [
    {"kind": "int", "bits": 4, "act_bits": 4, "act_mode": "lsq", "learned_scale": True},
    {"kind": "binary", "bits": 1, "binary": "xnor", "scale_mode": "channel"},
])
def test_low_bit_models_export_to_onnx_as_float_simulation(data, tmp_path, spec):
    """Below 8 bits there is no int kernel in ORT, but the model still exports and computes the same."""
    model = quantized(data, spec)
    again = load_model(save_model(model, tmp_path / "q.pt")).eval()  # the cache is rebuilt on load
    from compress.quant.ptq_onnx import export_onnx

    path = export_onnx(again, data.example_input(1), tmp_path / "low.onnx")
    x = data.example_input(32)
    assert torch.allclose(OrtModel(path)(x), model(x).detach(), atol=1e-4)


@pytest.mark.parametrize("method", ["qat", "weight_only"])
def test_transformer_linear_layers_quantize_and_reload(tmp_path, method):
    """transformers' ViT reads ``projection.weight.dtype`` before its forward: the wrapper answers for its layer."""
    pytest.importorskip("transformers", reason="transformers is the optional extra compress[hf]")
    from compress import QuantizeConfig, quantize

    data = create_data({"name": "synthetic", "num_samples": 32, "num_classes": 3, "shape": [3, 16, 16], "batch_size": 8})
    cfg = {"model_type": "vit", "image_size": 16, "patch_size": 8, "num_channels": 3, "hidden_size": 16,
           "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32}
    torch.manual_seed(0)
    model = create_model({"name": "hf", "config": cfg}, data.input_shape, 3)
    opts = {"finetune": {"epochs": 1, "progress": False}, "calibration_batches": 1} if method == "qat" else {"bits": 4}
    model, _ = quantize(model, QuantizeConfig(method=method, **opts), data, out_dir=tmp_path)
    wrapped = quant_layers(model)
    assert any(".attention." in n for n, m in model.named_modules() if isinstance(m, QuantLayer))
    assert len(wrapped) == sum(1 for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    proj = model.model.vit.embeddings.patch_embeddings.projection
    assert proj.weight.shape == proj.weight_shape and proj.kernel_size == (8, 8)  # answers as the conv it wraps
    save_model(model, tmp_path / "m.pt")
    x = data.example_input(4)
    assert torch.allclose(load_model(tmp_path / "m.pt").eval()(x), model.eval()(x), atol=1e-5)
