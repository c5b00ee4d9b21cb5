"""int8 files right on every x86 CPU: format choice, saturation check, uint8 rewrite, the agreement check.

None of these depends on the CPU that runs them: the saturation check reads the file, and ORT's float
simulation (optimizations off) is the same everywhere. The one test that runs ORT's AVX2 kernels does so
under QEMU's emulated Haswell CPU (no VNNI), on any x86 host, and skips where QEMU is not installed.
"""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from compress import QuantizeConfig, TrainConfig, create_data, create_model, quantize, train
from compress.errors import CompressError, RecipeError
from compress.runtime.onnx import onnx_run, onnx_session
from compress.quant import int8


@pytest.fixture(scope="module")
def data():
    return create_data({"name": "synthetic", "num_samples": 256, "num_classes": 4, "shape": [1, 8, 8],
                        "noise": 0.8, "batch_size": 32})


@pytest.fixture(scope="module")
def trained(data):
    torch.manual_seed(0)
    model = create_model("lenet5", data.input_shape, data.num_outputs)
    return train(model, TrainConfig(epochs=3, optimizer={"lr": 5e-3}, progress=False), data)[0]


def test_format_for_any_cpu_is_portable_and_vnni_is_full_range():
    assert int8.resolve_format(target_cpu="any") == int8.Int8Format("int8", "uint8", True, True)
    assert int8.resolve_format(target_cpu="vnni").reduce_range is False
    assert int8.resolve_format(weight_type="uint8").portable and not int8.resolve_format(weight_type="uint8").reduce_range
    with pytest.raises(RecipeError, match=r"^stages\[3\]\.quantize\.reduce_range: full-range int8 weights saturate"):
        int8.resolve_format(reduce_range=False, path="stages[3].quantize")


@pytest.mark.parametrize("method", ["ptq_static", "ptq_dynamic"])
def test_ptq_files_are_portable_and_checked_against_float(data, trained, tmp_path, method):
    extra = {"calibration": {"batches": 4}} if method == "ptq_static" else {}
    _, m = quantize(trained, QuantizeConfig(method=method, **extra), data, out_dir=tmp_path)
    check = m["int8_check"]
    assert int8.saturation_risk(m["artifact"]) == []
    assert check["portable"] and check["split"] == "val" and check["samples"] > 0
    assert check["top1_agreement"] >= 0.97 and check["rel_diff"] <= 0.25
    assert check["format"] == "int8 (7-bit range) weights, uint8 activations"


# A full-range (vnni) file really is computed differently on CPUs without VNNI (the QEMU test below shows it),
# so the tests that only inspect such a file loosen its check: they must pass on any CPU.
LOOSE = {"max_rel_diff": 10.0, "min_top1_agreement": 0.0, "max_kernel_diff": 10.0}


def test_vnni_target_writes_full_range_weights_that_the_check_calls_risky(data, trained, tmp_path):
    _, m = quantize(trained, QuantizeConfig(target_cpu="vnni", calibration={"batches": 4}, check=LOOSE), data, out_dir=tmp_path)
    assert int8.saturation_risk(m["artifact"])  # can fail: the same check passes the portable file above
    assert m["int8_check"]["portable"] is False


def test_uint8_rewrite_keeps_every_number(data, trained, tmp_path):
    _, m = quantize(trained, QuantizeConfig(target_cpu="vnni", calibration={"batches": 4}, check=LOOSE), data, out_dir=tmp_path)
    s8 = m["artifact"]
    u8 = shutil.copy(s8, tmp_path / "u8.onnx")
    int8.to_uint8_weights(u8)
    assert int8.saturation_risk(u8) == []
    x = data.example_input(32)
    a = onnx_run(onnx_session(s8, optimize=False), x)
    b = onnx_run(onnx_session(u8, optimize=False), x)
    assert np.array_equal(a, b)


def test_a_file_past_the_tolerance_is_set_aside_with_a_one_line_cause(data, trained, tmp_path):
    cfg = QuantizeConfig(calibration={"batches": 1}, check={"max_rel_diff": 1e-9})
    with pytest.raises(CompressError) as err:
        quantize(trained, cfg, data, out_dir=tmp_path, path="stages[2].quantize")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("stages[2].quantize: int8 outputs differ from the float reference by")
    assert "quantization itself" in msg and "val samples" in msg
    assert not (tmp_path / "model_int8.onnx").exists() and (tmp_path / "model_int8.rejected.onnx").is_file()


def test_verdict_blames_the_kernel_when_the_float_simulation_is_right():
    c = int8.Int8Check(split="val", samples=64, max_abs_diff=3.0, rel_diff=0.5, top1_agreement=0.8, sim_rel_diff=0.01,
                       kernel_rel_diff=0.5, sim_top1_agreement=1.0, portable=False, cpu="x86_64 with AVX2")
    msg = int8.verdict(c, max_rel_diff=0.25, min_top1_agreement=0.97)
    assert "the file is right" in msg and "allowed: 5%" in msg and "int8 kernels of this CPU (x86_64 with AVX2)" in msg
    assert "reduce_range: true" in msg
    ok = int8.Int8Check("val", 64, 0.01, 0.01, 1.0, 0.01, 0.0, 1.0, True, "x")
    assert int8.verdict(ok, max_rel_diff=0.25, min_top1_agreement=0.97) is None
    # a kernel off by more than requantization rounding fails even when the classes still agree
    subtle = int8.Int8Check("val", 64, 0.1, 0.08, 1.0, 0.01, 0.08, 1.0, True, "x")
    assert "int8 kernels of this CPU" in int8.verdict(subtle, max_rel_diff=0.25, min_top1_agreement=0.97)


# A QDQ MatMul whose int8 kernel saturates without VNNI: activations 255 x weights 127, K = 64.
_SATURATING_FILE = r'''
import sys, numpy as np, onnx
from onnx import helper, numpy_helper, TensorProto as T
K = 64
w = numpy_helper.from_array(np.full((K, 8), 127, np.int8), "w")
init = [w, numpy_helper.from_array(np.array(1 / 255, np.float32), "xs"), numpy_helper.from_array(np.array(0, np.uint8), "xz"),
        numpy_helper.from_array(np.array(0.01, np.float32), "ws"), numpy_helper.from_array(np.array(0, np.int8), "wz"),
        numpy_helper.from_array(np.array(2.0, np.float32), "ys"), numpy_helper.from_array(np.array(0, np.uint8), "yz")]
nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]), helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
         helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"]), helper.make_node("MatMul", ["xd", "wd"], ["y0"]),
         helper.make_node("QuantizeLinear", ["y0", "ys", "yz"], ["yq"]), helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["y"])]
g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", T.FLOAT, [4, K])],
                      [helper.make_tensor_value_info("y", T.FLOAT, [4, 8])], init)
onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), sys.argv[1])
'''

_RUN = r'''
import json, sys, numpy as np, onnxruntime as ort
x = np.ones((4, 64), np.float32)
out = {}
for p in sys.argv[1:]:
    y = ort.InferenceSession(p, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    out[p] = float(y.max())
print(json.dumps(out))
'''


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("qemu-x86_64") is None, reason="needs qemu-x86_64 (Debian: qemu-user) to emulate an AVX2-only CPU")
def test_on_an_emulated_avx2_cpu_only_the_portable_file_is_right(tmp_path):
    s8, u8 = tmp_path / "s8.onnx", tmp_path / "u8.onnx"
    subprocess.run([sys.executable, "-c", _SATURATING_FILE, str(s8)], check=True)
    shutil.copy(s8, u8)
    int8.to_uint8_weights(u8)
    assert int8.saturation_risk(s8) and not int8.saturation_risk(u8)
    exact = 64 * 1.0 * 127 * 0.01  # 81.28 -> 82 after the output's 2.0 step
    run = subprocess.run(["qemu-x86_64", "-cpu", "Haswell", sys.executable, "-c", _RUN, str(s8), str(u8)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert abs(got[str(u8)] - exact) <= 2.0  # U8U8: exact up to the output step
    assert got[str(s8)] < exact / 1.5  # U8S8 on AVX2: VPMADDUBSW saturates (32,767 per pair)


def test_quantize_without_a_folder_leaves_no_temporary_folder_behind(data, trained, tmp_path, monkeypatch):
    import gc
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    ort_model, m = quantize(trained, QuantizeConfig(calibration={"batches": 1}), data)
    assert len(list(tmp_path.glob("compress-quantize-*"))) == 1 and ort_model(data.example_input(2)).shape[0] == 2
    del ort_model, m
    gc.collect()
    assert list(tmp_path.glob("compress-quantize-*")) == []
    with pytest.raises(CompressError):  # a failed call cleans up too
        quantize(trained, QuantizeConfig(calibration={"batches": 1}, check={"max_rel_diff": 1e-9}), data)
    assert list(tmp_path.glob("compress-quantize-*")) == []
