import os

import pytest
import torch
import torch.nn as nn

from compress.measure.size import (bits_per_weight, count_macs, count_params, file_size, layer_stats, onnx_weights,
                                   saved_size, weight_bytes, zipped_size)
from compress.runtime.onnx import to_onnx


def test_params_nonzeros_and_sizes_on_a_known_model(tmp_path):
    m = nn.Sequential(nn.Linear(10, 5), nn.Linear(5, 2))  # 55 + 12 parameters
    with torch.no_grad():
        m[0].weight[:, :4] = 0  # 20 zeros
    assert count_params(m) == (67, 47)
    f = tmp_path / "w.pt"
    torch.save(m.state_dict(), f)
    assert file_size(f) == os.path.getsize(f)
    assert saved_size(m) > 67 * 4  # float32 weights plus the checkpoint's metadata
    assert bits_per_weight(1000, 250) == 32.0
    assert bits_per_weight(10, 0) is None
    assert weight_bytes(m) == 67 * 4 and bits_per_weight(weight_bytes(m), 67) == 32.0  # float32: 32, no overhead
    assert weight_bytes(m.half()) == 67 * 2


def test_stored_tensors_count_as_parameters_once():
    class Packed(nn.Module):  # weights kept as a buffer, like a packed low-bit layer
        def __init__(self):
            super().__init__()
            self.register_buffer("codes", torch.tensor([0, 3, 0, 7], dtype=torch.uint8))
            self.register_buffer("scale", torch.ones(2))  # not stored weights: not counted

        def stored_tensors(self):
            return [self.codes]

    p = Packed()
    m = nn.Sequential(nn.Linear(2, 1), p, p)  # shared: counted once
    assert count_params(m) == (3 + 4, 3 + 2)


def test_packed_quant_layer_counts_its_codes(tmp_path):
    from compress.quant.qat import QuantLayer

    layer = QuantLayer(nn.Linear(16, 4, bias=False), {"kind": "int", "bits": 4})
    assert count_params(layer) == (64, int(torch.count_nonzero(layer.inner.weight)))
    layer.pack()
    assert count_params(layer)[0] == 64 * 4 // 8  # the packed bytes, as stored


def test_zipped_size_sees_redundancy(tmp_path):
    zeros, noise = tmp_path / "zeros.bin", tmp_path / "noise.bin"
    zeros.write_bytes(bytes(100_000))
    noise.write_bytes(os.urandom(100_000))
    assert zipped_size(zeros) < 1_000
    assert 100_000 <= zipped_size(noise) < 101_000  # incompressible: raw plus the zip headers


def test_macs_of_a_known_conv_linear_stack():
    # conv 1->4, 3x3 on 8x8: 4*9*6*6 = 1296 MACs; ReLU: 144 elementwise ops; linear 144->10: 1440 MACs
    # plus 10 bias adds (torch-pruning's convention counts elementwise ops and bias too).
    m = nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(144, 10))
    assert count_macs(m, torch.zeros(3, 1, 8, 8)) == (1296 + 144 + 1440 + 10, 36 + 1450)  # (MACs, parameters)
    assert m.training  # mode restored


def test_macs_of_an_untraceable_model_warn_or_raise_when_strict():
    class Odd(nn.Module):  # a forward the counter cannot run
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            raise RuntimeError("no tracing here")

    with pytest.warns(UserWarning, match="MACs not counted: RuntimeError: no tracing here"):
        assert count_macs(Odd(), torch.zeros(1, 4)) == (None, 10)
    with pytest.raises(RuntimeError, match="no tracing here"):
        count_macs(Odd(), torch.zeros(1, 4), strict=True)


def test_onnx_weights_count_initializers(tmp_path):
    m = nn.Sequential(nn.Flatten(), nn.Linear(16, 5))
    with torch.no_grad():
        m[1].weight[0] = 0
    p = to_onnx(m, torch.zeros(2, 1, 4, 4), tmp_path / "m.onnx")
    assert onnx_weights(p) == (85, 85 - 16, 85 * 4)


def test_onnx_weights_of_an_int8_file_leave_out_scales_and_zero_points(tmp_path):
    """Per-channel scales and zero points are vectors, not weights: an int8 file counts what its float model does."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    codes = np.array([[1, 0, -3], [4, 5, 0], [0, 0, 7], [2, 2, 2]], dtype=np.int8)  # 4 outputs x 3 inputs
    inits = [numpy_helper.from_array(codes, "w_quantized"), numpy_helper.from_array(np.full(4, 0.1, np.float32), "w_scale"),
             numpy_helper.from_array(np.zeros(4, np.int8), "w_zero_point"),
             numpy_helper.from_array(np.ones(4, np.float32), "bias")]
    nodes = [helper.make_node("DequantizeLinear", ["w_quantized", "w_scale", "w_zero_point"], ["w"], axis=0),
             helper.make_node("Gemm", ["x", "w", "bias"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "q.onnx")
    params, nonzero, nbytes = onnx_weights(tmp_path / "q.onnx")
    assert (params, nonzero) == (12 + 4, 8 + 4)
    assert bits_per_weight(nbytes, params) == (12 * 8 + 4 * 32) / 16  # int8 codes, float32 biases: at most 32


def test_layer_stats_name_layers_by_module_path_with_type_and_shape():
    m = nn.Sequential(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()), nn.Flatten(), nn.Linear(8, 2))
    m.add_module("norm", nn.LayerNorm(2))  # a 1-D weight: no layer of the plot
    assert [(s["name"], s["type"], s["shape"]) for s in layer_stats(m)] == [
        ("0.0", "Conv2d", [2, 1, 3, 3]), ("2", "Linear", [2, 8])]


def test_macs_of_decoder_lms_count_conv1d_and_attention():
    """torch-pruning's counter sees neither GPT-2's Conv1D projections nor the attention products: decoder LMs
    are counted from their layout, 2 x seq^2 x heads x head_dim per layer on top of the weights per token."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=32)
    model = transformers.GPT2LMHeadModel(cfg)
    per_layer = 16 * 48 + 16 * 16 + 16 * 64 + 64 * 16  # c_attn, c_proj, c_fc, mlp.c_proj (Conv1D)
    macs, params = count_macs(model, torch.zeros(1, 8, dtype=torch.long))
    assert macs == 8 * (2 * per_layer + 50 * 16) + 2 * 2 * 8 * 8 * 2 * 8
    assert params == sum(p.numel() for p in model.parameters())
