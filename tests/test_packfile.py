import copy
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings, strategies as st

from compress import ClusterConfig, CompressError, QuantizeConfig, bake, cluster, create_data, create_model, encode, \
    load_model, quantize, save_model
from compress import packfile
from compress.cli import cli
from compress.models.kernelnet import KernelLinear
from compress.packfile import (MAGIC, _assemble, decode_tensor, encode_tensor, pack_bits, pack_model, pack_onnx, positions_from_gaps,
                               read_packed, relative_gaps, unpack_bits)
from compress.runtime.onnx import OrtModel
from compress.stages.encode import clear_negative_zeros, same_weights


@pytest.fixture(scope="module")
def data():
    return create_data({"name": "synthetic", "num_samples": 64, "num_classes": 3, "shape": [1, 8, 8], "batch_size": 32})


def _roundtrip(model, tmp_path, name="m.cpk"):
    pack_model(model, tmp_path / name)
    back = load_model(tmp_path / name)
    assert same_weights(model, back) == []
    return back


def _prune(model, share=0.6):
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p[p.abs() < p.abs().quantile(share)] = 0
    return model


def _one(t: torch.Tensor) -> torch.Tensor:
    entry, coded = encode_tensor(t)
    payload, streams = b"", []
    for role, coder, blob, raw in coded:
        streams.append({"role": role, "coder": coder, "offset": len(payload), "length": len(blob), "raw": raw})
        payload += blob
    return decode_tensor({**entry, "streams": streams}, memoryview(payload), "t"), entry


@pytest.mark.parametrize("t", [
    torch.tensor([0.0, -0.0, float("nan"), 1e-30, -2.5]),  # bit patterns, not values
    torch.tensor(3.5), torch.zeros(0, 4), torch.zeros(5, 7), torch.arange(-3, 9, dtype=torch.int64).view(3, 4),
    torch.tensor([True, False, True]), torch.randn(6, 5).to(torch.bfloat16), torch.randint(0, 255, (40,), dtype=torch.uint8),
])
def test_every_tensor_kind_reads_back_bit_exact(t):
    got, _ = _one(t)
    assert got.dtype == t.dtype and got.shape == t.shape
    assert torch.equal(got.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("density", [0.0, 0.003, 0.3, 1.0])
def test_every_encoding_decodes_bit_exact_a_chunk_at_a_time(monkeypatch, density):
    """Decoding works through long tensors a chunk of entries at a time (bounded temporaries): chunks of 64
    here, so that gaps, fillers, bitmask bytes and codes of 3, 7 and 8 bits all cross chunk boundaries."""
    monkeypatch.setattr(packfile, "_CHUNK", 64)
    g = torch.Generator().manual_seed(0)
    keep = torch.rand(1000, generator=g) < density
    book = torch.tensor([-0.5, -0.25, 0.125, 0.75, 1.5])
    for t in [torch.where(keep, book[torch.randint(0, 5, (1000,), generator=g)], 0.0).view(20, 50),  # 3-bit codes
              torch.where(keep, torch.randn(1000, generator=g), 0.0),  # raw values
              torch.where(keep, torch.randint(-64, 64, (1000,), generator=g), 0).to(torch.int8),  # 7-bit codes
              torch.where(keep, torch.randint(0, 256, (1000,), generator=g), 0).to(torch.uint8),  # up to 8-bit codes
              keep.clone()]:
        nnz = int(np.count_nonzero(packfile._bit_view(t)))
        for desc, streams in packfile._candidates(t):
            payload, ss = b"", []
            for role, raw in streams.items():
                ss.append({"role": role, "coder": "none", "offset": len(payload), "length": len(raw), "raw": len(raw)})
                payload += raw
            entry = {"dtype": packfile.DTYPE_NAMES[t.dtype], "shape": list(t.shape), "nnz": nnz, **desc, "streams": ss}
            got = decode_tensor(entry, memoryview(payload), "t")
            assert got.dtype == t.dtype and torch.equal(got.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), desc


def test_shared_sparse_weights_use_a_codebook_and_a_sparse_index():
    torch.manual_seed(0)
    codebook = torch.tensor([-0.3, -0.1, 0.05, 0.2])
    w = torch.where(torch.rand(300, 100) < 0.1, codebook[torch.randint(0, 4, (300, 100))], 0.0)
    got, entry = _one(w)
    assert torch.equal(got, w)
    assert entry["values"] == "codebook" and entry["bits"] == 2 and entry["sparse"] in ("bitmask", "relative")


def test_encode_clears_negative_zeros_that_masks_leave(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(50, 40))
    with torch.no_grad():
        model[0].weight.mul_(torch.rand(40, 50) < 0.2)  # how pruning masks are applied: -w * 0 = -0.0
    assert torch.signbit(model[0].weight[model[0].weight == 0]).any()
    plain = copy.deepcopy(model)
    assert clear_negative_zeros(model) > 0 and not torch.signbit(model[0].weight[model[0].weight == 0]).any()
    assert torch.equal(model[0].weight, plain[0].weight)  # the same numbers


@settings(max_examples=40, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=400), st.integers(1, 8))
def test_relative_indices_with_fillers_give_the_positions_back(mask, rbits):
    pos = np.flatnonzero(mask)
    gaps = relative_gaps(pos, rbits)
    assert gaps.max(initial=0) < 2 ** rbits
    assert np.array_equal(positions_from_gaps(unpack_bits(pack_bits(gaps, rbits), rbits, gaps.size), rbits), pos)


def test_linear_and_conv_models_pruned_and_clustered_round_trip(data, tmp_path):
    torch.manual_seed(0)
    model = _prune(create_model({"name": "lenet5", "width": 1}, data.input_shape, data.num_outputs))
    plain = _roundtrip(copy.deepcopy(model), tmp_path, "plain.cpk")
    model, _ = cluster(model, ClusterConfig(bits=4, finetune={"epochs": 0}), data)
    back = _roundtrip(model, tmp_path)
    x = data.example_input(4)
    assert torch.equal(back(x), model.eval()(x)) and type(plain) is type(model)
    assert (tmp_path / "m.cpk").stat().st_size < (tmp_path / "plain.cpk").stat().st_size / 3
    back2, facts = encode(model, out=tmp_path / "e.cpk")
    assert facts["packed_bytes"] < facts["raw_bytes"] / 6 and facts["weight_bits_per_nonzero"] < 8


def test_baked_kernelnet_and_bn_models_round_trip(tmp_path):
    torch.manual_seed(1)
    kn = create_model({"name": "kernelnet_autoencoder", "hidden": [16]}, (20,), 20)
    with torch.no_grad():
        for m in kn.modules():
            if isinstance(m, KernelLinear):
                m.u.normal_(0, 0.5)
                m.v.normal_(0, 0.5)
    _roundtrip(kn, tmp_path, "kn.cpk")  # KernelLinear as it is
    baked, _ = bake(kn)
    back = _roundtrip(baked, tmp_path, "baked.cpk")
    assert not any(isinstance(m, KernelLinear) for m in back.modules())
    bn = create_model({"name": "smallcnn", "widths": [4, 8]}, (1, 8, 8), 3)  # BatchNorm buffers (int64 counter)
    _roundtrip(bn, tmp_path, "bn.cpk")


@pytest.mark.parametrize("options", [
    {"method": "binary", "keep_first_last": False},  # packed 1-bit weights
    {"method": "weight_only", "bits": 4, "rounds": 1},  # packed 4-bit weights
    {"method": "qat", "bits": 4, "keep_first_last": False},  # fake-quantized (observers, scales)
])
def test_packed_and_quantized_models_round_trip(data, tmp_path, options):
    torch.manual_seed(0)
    mlp = create_model({"name": "mlp", "hidden": [32]}, data.input_shape, data.num_outputs)
    model, _ = quantize(mlp, QuantizeConfig(**options, finetune={"epochs": 0}), data)
    back = _roundtrip(model, tmp_path)
    x = data.example_input(3)
    assert torch.equal(back.eval()(x), model.eval()(x))


@pytest.fixture
def packed(tmp_path, data):
    model = _prune(create_model({"name": "mlp", "hidden": [16]}, data.input_shape, data.num_outputs))
    pack_model(model, tmp_path / "m.cpk")
    return tmp_path / "m.cpk"


def _header(blob: bytes) -> tuple[dict, int]:
    hlen = struct.unpack("<I", blob[10:14])[0]
    return json.loads(zlib.decompress(blob[22:22 + hlen])), hlen


def _rewrite(blob: bytes, header: dict, hlen: int) -> bytes:
    """The file with another header (and a CRC that fits it: a crafted file, not a damaged one)."""
    return _assemble(zlib.compress(json.dumps(header).encode()), blob[22 + hlen:])


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:len(b) - 7], "truncated or padded"),
    (lambda b: b[:30], "truncated packed file"),
    (lambda b: b[:20], "truncated packed file"),
    (lambda b: b"", "the file is empty"),
    (lambda b: b[:4] + struct.pack("<H", 9) + b[6:], "version 9"),
    (lambda b: b[:-1] + bytes([b[-1] ^ 4]), "CRC-32 mismatch"),
    (lambda b: _assemble(b"\xff\xff" + b[24:40], b""), "not valid deflated JSON"),
])
def test_a_corrupt_or_truncated_file_is_a_one_line_error(packed, damage, message):
    packed.write_bytes(damage(packed.read_bytes()))
    with pytest.raises(CompressError, match=message) as exc:
        load_model(packed)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("edit, message", [
    (lambda e: e.update(shape=[1 << 40, 1 << 20]), "implausible sizes"),
    (lambda e: e["streams"][0].update(raw=e["streams"][0]["raw"] * 1000), "does not fit"),
    (lambda e: e["streams"][0].update(offset=10 ** 9), "does not fit"),
    (lambda e: e.update(dtype="object"), "malformed"),
    (lambda e: e.update(nnz=e["nnz"] + 1) if e["sparse"] != "dense" else e.update(sparse="bitmask"),
     "does not fit|expected"),
])
def test_crafted_headers_are_refused_before_anything_is_allocated(packed, edit, message):
    blob = packed.read_bytes()
    header, hlen = _header(blob)
    weight = next(e for e in header["tensors"] if e["name"].endswith("weight"))
    edit(weight)
    packed.write_bytes(_rewrite(blob, header, hlen))
    with pytest.raises(CompressError, match=message) as exc:
        read_packed(packed)
    assert "\n" not in str(exc.value)


def test_pack_cli_writes_and_reports_and_errors_are_one_line(tmp_path, data):
    model = _prune(create_model({"name": "mlp", "hidden": [16]}, data.input_shape, data.num_outputs))
    save_model(model, tmp_path / "m.pt")
    res = CliRunner().invoke(cli, ["pack", str(tmp_path / "m.pt"), "--layers"])
    assert res.exit_code == 0, res.output
    assert "smaller than m.pt" in res.output and "1.weight" in res.output
    assert same_weights(model, load_model(tmp_path / "m.cpk")) == []
    (tmp_path / "bad.cpk").write_bytes(MAGIC + b"\x01")
    res = CliRunner().invoke(cli, ["pack", str(tmp_path / "bad.cpk"), "-o", str(tmp_path / "x.cpk")])
    assert res.exit_code == 2 and res.output.count("\n") == 1 and "error:" in res.output


@pytest.fixture(scope="module")
def int8_onnx(data, tmp_path_factory):
    """A clustered LeNet-5 after int8 static PTQ (ONNX Runtime's quantizer): the file a PTQ stage ships."""
    torch.manual_seed(0)
    model = create_model({"name": "lenet5", "width": 1}, data.input_shape, data.num_outputs)
    model, _ = cluster(model, ClusterConfig(bits=4, finetune={"epochs": 0}), data)
    d = tmp_path_factory.mktemp("ptq")
    _, facts = quantize(model, QuantizeConfig(method="ptq_static", calibration={"batches": 2}), data, out_dir=d)
    return Path(facts["artifact"])


def test_an_int8_onnx_model_packs_and_loads_back_running_in_ort_bit_exact(int8_onnx, data, tmp_path):
    info = pack_onnx(int8_onnx, tmp_path / "q.cpk")
    back = load_model(tmp_path / "q.cpk")
    assert isinstance(back, OrtModel) and back.model_bytes == onnx.load_model(str(int8_onnx)).SerializeToString()
    x = data.example_input(7)
    assert torch.equal(back(x), OrtModel(int8_onnx)(x))
    assert info["bytes"] < int8_onnx.stat().st_size / 2  # 4-bit codebooks of the int8 weights, then entropy coding
    assert any(t["values"] == "codebook" and t["bits"] <= 4 for t in info["tensors"] if "weight" in t["name"])


def test_onnx_initializers_in_typed_fields_come_back_in_them(tmp_path):
    from onnx import TensorProto, helper

    w = helper.make_tensor("w", TensorProto.FLOAT, [2, 3], [0.0, 1.5, -2.0, 0.0, 0.0, 3.25], raw=False)
    k = helper.make_tensor("k", TensorProto.INT8, [3], [0, -7, 7], raw=False)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], [w, k])
    src = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(src))
    pack_onnx(src, tmp_path / "m.cpk")
    assert read_packed(tmp_path / "m.cpk")["onnx"] == onnx.load_model(str(src)).SerializeToString()


def test_a_damaged_packed_onnx_graph_is_a_one_line_error(int8_onnx, tmp_path):
    pack_onnx(int8_onnx, tmp_path / "q.cpk")
    blob = (tmp_path / "q.cpk").read_bytes()
    header, hlen = _header(blob)
    header["tensors"][0]["initializer"] = 10 ** 6
    (tmp_path / "q.cpk").write_bytes(_rewrite(blob, header, hlen))
    with pytest.raises(CompressError, match="no such initializer") as exc:
        load_model(tmp_path / "q.cpk")
    assert "\n" not in str(exc.value)
    (tmp_path / "q.cpk").write_bytes(blob[:-3])
    with pytest.raises(CompressError, match="truncated") as exc:
        load_model(tmp_path / "q.cpk")


def test_pack_cli_packs_an_onnx_file(int8_onnx, tmp_path):
    res = CliRunner().invoke(cli, ["pack", str(int8_onnx), "-o", str(tmp_path / "q.cpk")])
    assert res.exit_code == 0, res.output
    assert "smaller than model_int8.onnx" in res.output
    assert isinstance(load_model(tmp_path / "q.cpk"), OrtModel)


@pytest.mark.parametrize("content, message", [(None, "no such ONNX file"), (b"\x00\x01not an onnx model", "not an ONNX model")])
def test_pack_cli_on_a_missing_or_foreign_onnx_file_is_a_one_line_error(tmp_path, content, message):
    src = tmp_path / "m.onnx"
    if content is not None:
        src.write_bytes(content)
    res = CliRunner().invoke(cli, ["pack", str(src)])
    assert res.exit_code == 2 and res.output.count("\n") == 1 and message in res.output, res.output
    assert not list(tmp_path.glob("*.cpk*"))


def test_onnx_initializers_torch_cannot_hold_stay_in_the_graph_bit_exact(tmp_path):
    from onnx import TensorProto, helper

    b = helper.make_tensor("b", TensorProto.BFLOAT16, [3], [1.5, -2.0, 0.0])  # numpy_helper gives ml_dtypes arrays
    k = helper.make_tensor("k", TensorProto.INT8, [3], [0, -7, 7])
    graph = helper.make_graph([helper.make_node("Cast", ["b"], ["y"], to=TensorProto.FLOAT)], "g", [],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])], [b, k])
    src = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(src))
    info = pack_onnx(src, tmp_path / "m.cpk")
    assert read_packed(tmp_path / "m.cpk")["onnx"] == onnx.load_model(str(src)).SerializeToString()
    assert [t["name"] for t in info["tensors"]] == ["k", "onnx graph"]
