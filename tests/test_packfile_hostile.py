"""Hostile packed files and checkpoints (issue 24).

A crafted ``.cpk`` (valid CRC, lying header) or checkpoint (crafted spec, io or recorded transforms) is refused
with one line naming the file: ``CompressError`` from ``compress.load_model``, exit 2 from ``compress pack``.
It is refused before compress allocates more than the file honestly holds: every case runs once more in one
fresh subprocess that measures the growth of its peak RSS per case (/proc's VmHWM, reset before each case;
``resource.getrusage`` where there is no /proc). A damaged file (any single flipped bit) fails its CRC-32.
"""
from __future__ import annotations

import functools
import json
import math
import os
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from compress import CompressError, create_model, load_model
from compress.checkpoint_io import model_state
from compress.cli import cli
from compress.packfile import FORMAT, VERSION, _assemble, pack_bits, pack_state, read_packed
from compress.stages.encode import same_weights

SPEC = {"name": "mlp", "hidden": [16]}
IO = {"input_shape": [1, 8, 8], "num_outputs": 3}
MiB = 1 << 20


# -- building files -------------------------------------------------------------------------------------------

def _file(header: dict, payload: bytes = b"") -> bytes:
    """A packed file with a valid CRC: crafted, not damaged."""
    return _assemble(zlib.compress(json.dumps({"format": FORMAT, **header}).encode()), payload)


def _parts(blob: bytes) -> tuple[dict, bytes]:
    hlen, plen = struct.unpack_from("<IQ", blob, 10)
    return json.loads(zlib.decompress(blob[22:22 + hlen])), blob[22 + hlen:]


def _stream(role: str, raw: int, coder: str = "none", offset: int = 0, length: int = 0) -> dict:
    return {"role": role, "coder": coder, "offset": offset, "length": length, "raw": raw}


def _entry(name: str, shape: list[int], streams: list[dict], dtype: str = "float32", **kw) -> dict:
    return {"name": name, "dtype": dtype, "shape": shape, "nnz": kw.pop("nnz", math.prod(shape)), "sparse": "dense",
            "values": "raw", **kw, "streams": streams}


@functools.lru_cache(maxsize=None)
def _zeros_zstd(n: int) -> bytes:
    """``n`` zero bytes through zstd, compressed a MiB at a time (8 KiB for 256 MiB)."""
    import zstandard

    c = zstandard.ZstdCompressor(level=3).compressobj()
    chunk = bytes(MiB)
    return b"".join([c.compress(chunk) for _ in range(n // MiB)] + [c.flush()])


@functools.lru_cache(maxsize=None)
def _base_blob() -> bytes:
    torch.manual_seed(0)
    model = create_model(SPEC, (1, 8, 8), 3)
    with torch.no_grad():
        model[1].weight[model[1].weight.abs() < 0.05] = 0
    return pack_state(model_state(model))[0]


def _edited(edit) -> bytes:
    """The base file (a pruned MLP) with its header edited and a CRC that fits it."""
    header, payload = _parts(_base_blob())
    edit(header)
    header.pop("format")
    return _file(header, payload)


def _transforms(*ts) -> bytes:
    return _edited(lambda h: h.update(transforms=list(ts)))


def _nested(depth: int):
    v: object = 0
    for _ in range(depth):
        v = [v]
    return v


def _pt(transforms: list, io: dict = IO) -> bytes:
    """A .pt checkpoint of the base model with crafted recorded transforms / io."""
    import io as _io

    model = create_model(SPEC, (1, 8, 8), 3)
    buf = _io.BytesIO()
    torch.save({**model_state(model), "transforms": transforms, "io": io}, buf)
    return buf.getvalue()


def _bomb_in_place() -> bytes:
    """1.weight (16x64 float32, 4 KiB) declared dense, its stream the 8 KiB zstd bomb of 256 MiB."""
    header, payload = _parts(_base_blob())
    bomb = _zeros_zstd(256 * MiB)
    w = next(e for e in header["tensors"] if e["name"] == "1.weight")
    w.update(sparse="dense", values="raw", nnz=1024, streams=[_stream("values", 4096, "zstd", len(payload), len(bomb))])
    header.pop("format")
    return _file(header, payload + bomb)


def _one_bit_codebook() -> bytes:
    """A 128 MiB weight (an MLP 4096 -> 8192) as one codebook value at 1 bit each: 4 MiB of zero bits, zstd."""
    codes = _zeros_zstd(4 * MiB)
    e = _entry("1.weight", [8192, 4096], [_stream("codebook", 4, "none", 0, 4), _stream("values", 4 * MiB, "zstd", 4, len(codes))],
               values="codebook", k=1, bits=1)
    return _file({"spec": {"name": "mlp", "hidden": [8192]}, "io": {"input_shape": [1, 64, 64], "num_outputs": 3},
                  "tensors": [e]}, struct.pack("<f", 0.5) + codes)


# id -> (suffix, file bytes builder, message regex, environment)
CASES = {
    # the review's five: what a tiny file declares is refused before it is decoded or built
    "2^26-entry tensor": (".cpk", lambda: _file({"spec": SPEC, "io": IO, "tensors": [_entry(
        "1.weight", [1 << 26], [_stream("index", 0), _stream("values", 0)], sparse="relative", nnz=0, rbits=1, entries=0)]}),
        r"its 1 tensor would take 256\.0 MiB, more than the 64\.\d MiB this file may unpack to \(64 MiB \+ 256x its \d+ B\); "
        r"if you trust the file, raise the limit with COMPRESS_MAX_UNPACK_BYTES", {}),
    "2^26-entry tensor, limit raised": (".cpk", lambda: CASES["2^26-entry tensor"][1](),
                                        r"weights do not fit the model", {"COMPRESS_MAX_UNPACK_BYTES": "4G"}),
    "8 KiB zstd stream of 256 MiB": (".cpk", lambda: _file({"spec": SPEC, "io": IO, "tensors": [_entry(
        "1.weight", [1 << 26], [_stream("values", 1 << 28, "zstd", 0, len(_zeros_zstd(256 * MiB)))])]},
        _zeros_zstd(256 * MiB)), r"would take 256\.0 MiB", {}),
    "8 KiB zstd stream of 256 MiB for a 4 KiB tensor": (".cpk", _bomb_in_place, r"decodes to 4097\+ bytes, expected 4096", {}),
    "1-bit codebook of a 128 MiB tensor": (".cpk", _one_bit_codebook, r"its 1 tensor would take 128\.0 MiB", {}),
    "spec of mlp [16384, 16384]": (".cpk", lambda: _file({"spec": {"name": "mlp", "hidden": [16384, 16384]}, "io": IO,
                                                          "tensors": []}), r"the model it describes \(spec, io, transforms\) would take more than the 6\d\.\d MiB", {}),
    "16 GiB tensor": (".cpk", lambda: _file({"spec": SPEC, "io": IO, "tensors": [_entry("1.weight", [1 << 32], [
        _stream("values", 1 << 34)])]}), r"would take 16\.0 GiB", {}),
    # specs and io that build far more than the file holds
    "spec of 100,000 layers": (".cpk", lambda: _file({"spec": {"name": "mlp", "hidden": [1] * 100_000}, "io": IO,
                                                      "tensors": []}), r"the model it describes \(spec, io, transforms\) would take more than the 6\d\.\d MiB", {}),
    "io of a 10^10-pixel image": (".cpk", lambda: _file({"spec": {"name": "lenet5"}, "io": {
        "input_shape": [1, 100_000, 100_000], "num_outputs": 3}, "tensors": []}), r"the model it describes \(spec, io, transforms\) would take more than the 6\d\.\d MiB", {}),
    "io not a shape": (".cpk", lambda: _edited(lambda h: h.update(io={"input_shape": "abc"})), r"its io is not", {}),
    "spec value of the wrong type": (".cpk", lambda: _edited(lambda h: h["spec"].update(hidden="x")), r"model\.hidden", {}),
    # headers
    "header nested 100,000 deep": (".cpk", lambda: _assemble(zlib.compress(b"[" * 100_000 + b"]" * 100_000), b""),
                                   r"header nested too deep", {}),
    "spec nested 100 deep": (".cpk", lambda: _edited(lambda h: h["spec"].update(x=_nested(100))),
                             r"header nested over 64 deep", {}),
    "header inflating 1000x": (".cpk", lambda: _edited(lambda h: h.update(pad=" " * (16 * MiB - 4096))),
                               r"header inflates past", {}),
    "tensor named twice": (".cpk", lambda: _edited(lambda h: h["tensors"].append(h["tensors"][0])), r"the name comes twice", {}),
    "dtype not a string": (".cpk", lambda: _edited(lambda h: h["tensors"][0].update(dtype=["float32"])), r"malformed tensor entry", {}),
    "role not a string": (".cpk", lambda: _edited(lambda h: h["tensors"][0]["streams"][0].update(role={})), r"stream #0 does not fit", {}),
    "65 dimensions": (".cpk", lambda: _edited(lambda h: h["tensors"][0].update(shape=[1] * 65)), r"malformed tensor entry", {}),
    "packed ONNX graph of 16 GiB": (".cpk", lambda: _file({"onnx": _entry("onnx graph", [1 << 34], [_stream("values", 1 << 34)],
                                                                          dtype="uint8"), "io": None, "tensors": []}),
                                    r"would take 16\.0 GiB", {}),
    # recorded transforms: whatever the replay raises is one line
    "transform without its params": (".cpk", lambda: _transforms({"kind": "fold_bn", "params": {}}),
                                     r"recorded transform 0 \(fold_bn\) does not apply to its model \(KeyError: 'pairs'\)", {}),
    "transform naming no module": (".cpk", lambda: _transforms({"kind": "fold_bn", "params": {"pairs": [["nope", "x"]]}}),
                                   r"\(fold_bn\) does not apply to its model \(AttributeError", {}),
    "transform of a negative shape": (".cpk", lambda: _transforms({"kind": "channel_prune", "params": {"shapes": {"1.weight": [-1, 64]}}}),
                                      r"\(channel_prune\) does not apply to its model \(RuntimeError", {}),
    "transform of a string shape": (".cpk", lambda: _transforms({"kind": "channel_prune", "params": {"shapes": {"1.weight": "ab"}}}),
                                    r"\(channel_prune\) does not apply to its model \(TypeError", {}),
    "transform of an int": (".cpk", lambda: _transforms({"kind": "qat", "params": {"layers": 5}}),
                            r"\(qat\) does not apply to its model \(AttributeError", {}),
    "transform growing a layer to 1 GiB": (".cpk", lambda: _transforms({"kind": "channel_prune", "params": {"shapes": {"1.weight": [16384, 16384]}}}),
                                           r"the model it describes \(spec, io, transforms\) would take more than the 6\d\.\d MiB", {}),
    "transform of an unknown kind": (".cpk", lambda: _transforms({"kind": "rm -rf"}), r"unknown kind 'rm -rf'", {}),
    "transforms not a list": (".cpk", lambda: _edited(lambda h: h.update(transforms="abc")), r"not a list", {}),
    "transform not a mapping": (".cpk", lambda: _transforms(5), r"recorded transform 0 is not a kind and params", {}),
    ".pt transform without its params": (".pt", lambda: _pt([{"kind": "fold_bn", "params": {}}]), r"\(KeyError: 'pairs'\)", {}),
    ".pt io of a 10^10-pixel image": (".pt", lambda: _pt([], {"input_shape": [1, 100_000, 100_000], "num_outputs": 3}),
                                      r"the model it describes \(spec, io, transforms\) would take more than the 6\d\.\d MiB", {}),
}


@pytest.fixture
def env(monkeypatch):
    monkeypatch.delenv("COMPRESS_MAX_UNPACK_BYTES", raising=False)
    return monkeypatch


def _write(tmp_path: Path, case: str, stem: str = "hostile") -> Path:
    suffix, build, _, _ = CASES[case]
    path = tmp_path / f"{stem}{suffix}"
    path.write_bytes(build())
    return path


@pytest.mark.parametrize("case", list(CASES))
def test_a_hostile_file_is_one_line_from_load_model(case, tmp_path, env):
    path = _write(tmp_path, case)
    for k, v in CASES[case][3].items():
        env.setenv(k, v)
    with pytest.raises(CompressError, match=CASES[case][2]) as exc:
        load_model(path)
    assert "\n" not in str(exc.value) and str(exc.value).startswith(str(path)), str(exc.value)


@pytest.mark.parametrize("case", [c for c in CASES if c.startswith(("transform", ".pt", "spec of mlp", "2^26", "16 GiB"))])
def test_compress_pack_of_a_hostile_file_is_one_line_and_exit_2(case, tmp_path, env):
    path = _write(tmp_path, case)
    res = CliRunner().invoke(cli, ["pack", str(path), "-o", str(tmp_path / "out.cpk")], env=CASES[case][3])
    assert res.exit_code == 2 and res.output.count("\n") == 1 and res.output.startswith("error: "), res.output
    assert not (tmp_path / "out.cpk").exists()


def test_the_review_cases_are_the_tiny_files_it_describes():
    sizes = {c: len(CASES[c][1]()) for c in ("2^26-entry tensor", "16 GiB tensor", "spec of mlp [16384, 16384]",
                                             "8 KiB zstd stream of 256 MiB", "1-bit codebook of a 128 MiB tensor")}
    assert max(sizes.values()) < 12_000, sizes


def _honest_blob() -> tuple[bytes, int]:
    """A 25 MiB MLP, pruned to 10% and sharing 4 values (bitmask index, 2-bit codebook), packed by hand:
    a legitimate file of about 1 MiB. Returns (file, bytes its tensors take)."""
    torch.manual_seed(0)
    model = create_model({"name": "mlp", "hidden": [6144]}, (1, 32, 32), 3)
    header = {"spec": model.compress_spec, "io": model.compress_io, "transforms": [], "meta": {}, "tensors": []}
    payload, total = bytearray(), 0
    for name, t in model.state_dict().items():
        bits = t.reshape(-1).view(torch.int32).numpy()
        total += bits.nbytes
        if name == "1.weight":
            book = np.array([-0.2, -0.1, 0.1, 0.2], dtype=np.float32).view(np.uint32)
            rng = np.random.default_rng(0)
            nz = rng.random(bits.size) < 0.1
            codes = rng.integers(0, 4, int(nz.sum()))
            parts = {"index": np.packbits(nz, bitorder="little").tobytes(), "codebook": book.tobytes(), "values": pack_bits(codes, 2)}
            kw = {"sparse": "bitmask", "values": "codebook", "k": 4, "bits": 2, "nnz": int(nz.sum())}
        else:
            parts, kw = {"values": bits.tobytes()}, {}
        streams = []
        for role, data in parts.items():
            streams.append(_stream(role, len(data), "none", len(payload), len(data)))
            payload += data
        header["tensors"].append(_entry(name, list(t.shape), streams, **kw))
    return _file(header, bytes(payload)), total


def test_hostile_files_leave_peak_memory_bounded_and_an_honest_one_takes_a_small_multiple(tmp_path):
    """One fresh interpreter: the growth of peak RSS over loading an honest 25 MiB model from a 1 MiB file,
    then over each case (every one refused)."""
    files = {case: str(_write(tmp_path, case, f"case{i}")) for i, case in enumerate(CASES)}
    honest, honest_bytes = _honest_blob()
    (tmp_path / "honest.cpk").write_bytes(honest)
    script = textwrap.dedent("""
        import ctypes, json, os, resource, sys
        import compress
        from compress import CompressError, load_model

        def peak():
            # This process's own peak RSS. getrusage's ru_maxrss also holds the peak of the process this
            # one was forked from (kept across exec: pytest's, often above ours); /proc's VmHWM does not.
            try:
                with open("/proc/self/status") as f:
                    return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024
            except (OSError, StopIteration):
                return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

        def start():
            # Freed memory back to the system (else a case reuses what an earlier one freed, unseen), then
            # the peak reset to the current RSS (Linux >= 4.0): each case measured on its own, not under the
            # high-water mark of the imports or of an earlier case.
            try:
                ctypes.CDLL("libc.so.6").malloc_trim(0)
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                pass  # elsewhere: growth over the highest peak so far, a weaker bound
            return peak()

        cases, honest, small = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
        load_model(small)  # every import and first-call cost paid before measuring
        before = start()
        m = load_model(honest)
        out = {"honest": [peak() - before, sum(t.numel() * t.element_size() for t in m.state_dict().values())]}
        del m
        for name, (path, env) in cases.items():
            os.environ.pop("COMPRESS_MAX_UNPACK_BYTES", None)
            os.environ.update(env)
            before = start()
            try:
                load_model(path)
                msg = None
            except CompressError as exc:
                msg = str(exc)
            out[name] = [peak() - before, msg]
        print(json.dumps(out))
    """)
    (tmp_path / "small.cpk").write_bytes(_base_blob())
    arg = json.dumps({c: [files[c], CASES[c][3]] for c in CASES})
    env = {k: v for k, v in os.environ.items() if k != "COMPRESS_MAX_UNPACK_BYTES"}
    res = subprocess.run([sys.executable, "-c", script, arg, str(tmp_path / "honest.cpk"), str(tmp_path / "small.cpk")],
                         capture_output=True, text=True, timeout=300, env=env, cwd=Path(__file__).parents[1])
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.splitlines()[-1])
    grown = {c: round(out[c][0] / MiB, 1) for c in CASES}
    assert all(out[c][1] is not None for c in CASES), out  # every one refused
    # Refused before anything the size of what they declare (0.1 to 16 GiB) is allocated. The 100,000-layer
    # spec is stopped once its modules pass the 64 MiB limit (at 4 KiB charged each, about 3 KiB real).
    assert all(mb < (64 if c == "spec of 100,000 layers" else 24) for c, mb in grown.items()), grown
    growth, held = out["honest"]
    assert held == honest_bytes and growth < 3 * honest_bytes, (growth / MiB, held / MiB)


def test_every_single_bit_flip_is_refused(tmp_path):
    """300 flips spread over prefix, header and payload: the CRC-32 (or the prefix checks) refuse every one."""
    blob = _base_blob()
    rng = np.random.default_rng(0)
    path = tmp_path / "m.cpk"
    for pos in sorted(rng.choice(len(blob) * 8, 300, replace=False)):
        bad = bytearray(blob)
        bad[pos // 8] ^= 1 << (pos % 8)
        path.write_bytes(bad)
        with pytest.raises(CompressError) as exc:
            read_packed(path)
        assert "\n" not in str(exc.value)
    path.write_bytes(blob)
    read_packed(path)  # the undamaged file reads


def test_version_1_files_without_a_crc_still_load(tmp_path, env):
    header, payload = _parts(_base_blob())
    header["payload_length"] = len(payload)
    head = zlib.compress(json.dumps(header).encode())
    (tmp_path / "v1.cpk").write_bytes(b"CMPK" + struct.pack("<HI", 1, len(head)) + head + payload)
    (tmp_path / "v2.cpk").write_bytes(_base_blob())
    assert VERSION == 2 and same_weights(load_model(tmp_path / "v1.cpk"), load_model(tmp_path / "v2.cpk")) == []
    res = CliRunner().invoke(cli, ["pack", str(tmp_path / "v1.cpk"), "-o", str(tmp_path / "again.cpk")])
    assert res.exit_code == 0, res.output  # rewritten in the current version, with its CRC
    assert (tmp_path / "again.cpk").read_bytes()[4:6] == struct.pack("<H", VERSION)
    assert same_weights(load_model(tmp_path / "again.cpk"), load_model(tmp_path / "v2.cpk")) == []


def test_the_unpack_limit_is_raised_by_env_or_argument_and_a_bad_value_is_one_line(tmp_path, env):
    path = tmp_path / "m.cpk"
    path.write_bytes(_base_blob())
    with pytest.raises(CompressError, match=r"its 4 tensors would take .* \(max_bytes=1000\)"):
        load_model(path, max_bytes=1000)
    env.setenv("COMPRESS_MAX_UNPACK_BYTES", "2k")
    with pytest.raises(CompressError, match=r"\(COMPRESS_MAX_UNPACK_BYTES=2k\)"):
        load_model(path)
    env.setenv("COMPRESS_MAX_UNPACK_BYTES", "1.5M")
    load_model(path)
    env.setenv("COMPRESS_MAX_UNPACK_BYTES", "lots")
    with pytest.raises(CompressError, match=r"COMPRESS_MAX_UNPACK_BYTES='lots': expected a number of bytes"):
        load_model(path)


def _onnx_with(init) -> bytes:
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "g", [],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [init])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def _bad_raw():
    from onnx import TensorProto

    t = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[1000, 1000])
    t.raw_data = b"\x00" * 8  # 2 floats for a million
    return t


def _bad_type():
    from onnx import TensorProto

    t = TensorProto(name="w", data_type=999, dims=[2])
    t.raw_data = b"\x00" * 8
    return t


@pytest.mark.parametrize("init, message", [(_bad_raw, r"initializer 'w' is malformed \(ValueError"),
                                           (_bad_type, r"ONNX Runtime cannot load it")])
def test_compress_pack_of_a_malformed_onnx_is_one_line_and_exit_2(tmp_path, init, message):
    (tmp_path / "m.onnx").write_bytes(_onnx_with(init()))
    res = CliRunner().invoke(cli, ["pack", str(tmp_path / "m.onnx")])
    assert res.exit_code == 2 and res.output.count("\n") == 1, res.output
    assert res.output.startswith("error: ") and __import__("re").search(message, res.output), res.output
    assert not list(tmp_path.glob("*.cpk*"))


def _constant_reading(location: str, n: int) -> bytes:
    """An ONNX graph whose Constant node's tensor keeps its data in an external file (not an initializer)."""
    from onnx import TensorProto, helper

    t = TensorProto(name="v", data_type=TensorProto.UINT8, dims=[n], data_location=TensorProto.EXTERNAL)
    for k, v in (("location", location), ("offset", "0"), ("length", str(n))):
        e = t.external_data.add()
        e.key, e.value = k, v
    nodes = [helper.make_node("Constant", [], ["c"], value=t), helper.make_node("Cast", ["c"], ["cf"], to=TensorProto.FLOAT),
             helper.make_node("Add", ["x", "cf"], ["y"])]
    io = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, n]) for name in ("x", "y")]
    model = helper.make_model(helper.make_graph(nodes, "g", io[:1], io[1:]), opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def test_a_packed_onnx_graph_cannot_read_files_of_the_working_folder(tmp_path, monkeypatch):
    """Any tensor of the graph (here a Constant node's) naming external data is refused, when packing and
    when loading a crafted file: ONNX Runtime would read that file from the folder compress runs in."""
    import compress.packfile as pf

    monkeypatch.chdir(tmp_path)
    (tmp_path / "secret.bin").write_bytes(b"TOPSECRET-abcdefgh")
    graph = _constant_reading("secret.bin", 18)
    with pytest.raises(CompressError, match="keeps tensor data in external files"):
        pf.pack_onnx_state(graph, where="x.onnx")
    monkeypatch.setattr(pf, "refuse_external_data", lambda *a: None)  # a crafted file: its maker skipped the check
    blob = pf.pack_onnx_state(graph, where="x.onnx")[0]
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.cpk").write_bytes(blob)
    with pytest.raises(CompressError, match=r"x.cpk: keeps tensor data in external files"):
        load_model(tmp_path / "x.cpk")
