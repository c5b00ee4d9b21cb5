"""The packed model file (``.cpk``): Deep Compression's storage (sparse indices, codebook indices at their
bit width, entropy coding) for any model the tool saves, read back bit-exact by ``compress.load_model``.

Layout (version 2): ``b"CMPK"`` | version (uint16 LE) | CRC-32 (uint32 LE) of everything after it |
header length (uint32 LE) | payload length (uint64 LE) | header (UTF-8 JSON, deflated: tensor names and
offsets are a third of a small model's file otherwise) | payload. Version 1 files (no CRC, no payload
length in the prefix: ``b"CMPK"`` | version | header length | header | payload) are still read.
The header is plain data: the model spec, io, recorded transforms and meta as in a checkpoint, and one
entry per state_dict tensor naming its dtype, shape, encoding and byte streams (offset, length, coder,
decoded length) in the payload. Nothing is unpickled; a flipped bit anywhere fails the CRC; every entry and
length is checked against the tensor's shape and the file, and the sum of what the tensors unpack to
against ``unpack_limit`` (64 MiB + 256x the file's size, or ``COMPRESS_MAX_UNPACK_BYTES``), before any
tensor is decoded; decoders stop at the declared length.

Per tensor, every applicable encoding is built and the smallest kept:
  values: ``raw`` (the dtype's bytes) or ``codebook`` (tensors with <= 256 distinct non-zero values, e.g.
          after ``cluster``: the distinct values + indices packed at ceil(log2 k) bits);
  zeros:  ``dense`` (zeros stored like any value), ``bitmask`` (1 bit per entry) or ``relative`` (Deep
          Compression's gaps between non-zeros in r bits, a filler entry when a gap does not fit);
and every byte stream goes through the coder that makes it smallest of none / zlib / lzma / zstd.
"Zero" means the all-zero bit pattern, so -0.0 and NaN payloads round-trip exactly.
An ONNX model (an int8 PTQ file) is packed the same way: its initializers as tensors, the graph without
their data as one more stream (``pack_onnx``); ``load_model`` gives it back as a model run by ONNX Runtime.
"""
from __future__ import annotations

import json
import lzma
import math
import os
import re
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from compress.errors import CompressError, error_line
from compress.utils import atomic_path

MAGIC = b"CMPK"
VERSION = 2  # 2: CRC-32 and payload length in the prefix; 1 (no CRC) is still read
FORMAT = "compress.packed/1"
ONNX_FORMAT = "compress.packed-onnx/1"  # what read_packed returns for a packed ONNX model (its bytes under "onnx")
MAX_TENSOR_BYTES = 1 << 36  # a header claiming more than this for one tensor is refused before decoding
MAX_CODEBOOK = 256
MAX_DIMS = 64
# Decoded header bytes: at most MAX_HEADER, and at most HEADER_FLOOR + HEADER_RATIO x its deflated size (JSON
# of a real model deflates 5-20x; a few hundred bytes must not inflate into a header of millions of entries).
MAX_HEADER = 16 << 20
HEADER_FLOOR, HEADER_RATIO = 1 << 20, 64
MAX_DEPTH = 64  # nesting of the header's JSON (a real one is under 10 deep)
# What one file may unpack to (tensors decoded, and the model its spec builds): UNPACK_FLOOR + UNPACK_RATIO x
# the file's size, unless COMPRESS_MAX_UNPACK_BYTES (or load_model's max_bytes) says otherwise. Deep
# Compression reaches 35-49x on real networks (README: 42x for a clustered and packed student); 256x leaves
# room for models pruned to a few percent, and the floor lets any model up to 16M float32 weights load
# however well it packs. A file over it is refused before anything is decoded or built.
UNPACK_FLOOR, UNPACK_RATIO = 64 << 20, 256
UNPACK_ENV = "COMPRESS_MAX_UNPACK_BYTES"
_PREFIX = struct.Struct("<4sHIIQ")  # magic, version, crc32, header length, payload length

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8,
    "bool": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

# -- entropy coders: well-kept libraries (zstandard; lzma/zlib from the standard library) ----------------

# raw: no 60-byte .xz container; a 1 MiB dictionary (the preset's 64 MiB costs ~0.1 s to set up per stream)
_LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME, "dict_size": 1 << 20}]


def _zstd_c(b: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor(level=22, write_checksum=False, write_content_size=False).compress(b)


def _zstd_d(b: bytes, limit: int) -> bytes:
    import zstandard

    reader = zstandard.ZstdDecompressor().stream_reader(b)
    out = bytearray()
    while len(out) <= limit:  # reads grow with the real output, never with a claimed size
        chunk = reader.read(min(1 << 20, limit + 1 - len(out)))
        if not chunk:
            break
        out += chunk
    return out


def _zlib_d(b: bytes, limit: int) -> bytes:
    d = zlib.decompressobj()
    return d.decompress(b, limit + 1)


def _lzma_d(b: bytes, limit: int) -> bytes:
    d = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)
    return d.decompress(b, limit + 1)


CODERS = {
    "none": (lambda b: b, lambda b, limit: b[:limit + 1]),
    "zstd": (_zstd_c, _zstd_d),
    "zlib": (lambda b: zlib.compress(b, 9), _zlib_d),
    "lzma": (lambda b: lzma.compress(b, format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS), _lzma_d),
}


def _best_coded(raw: bytes) -> tuple[str, bytes]:
    """The coder that makes ``raw`` smallest (ties: the earlier in CODERS)."""
    best = ("none", raw)
    for name, (enc, _) in CODERS.items():
        if name != "none" and raw:
            c = enc(raw)
            if len(c) < len(best[1]):
                best = (name, c)
    return best


# -- bit-level pieces --------------------------------------------------------------------------------------
# Written with numpy's packbits/unpackbits: compress.quant.packing only covers 1/2/4/8 bits, and codebook
# indices (3, 5, 6, 7 bits) and relative gaps need any width.

def pack_bits(codes: np.ndarray, bits: int) -> bytes:
    codes = np.asarray(codes, dtype=np.int64).reshape(-1)
    planes = ((codes[:, None] >> np.arange(bits)) & 1).astype(np.uint8)
    return np.packbits(planes.reshape(-1), bitorder="little").tobytes()


_CHUNK = 1 << 20  # entries per step when unpacking: temporaries stay a few MiB whatever the tensor


def unpack_bits(buf: bytes, bits: int, n: int) -> np.ndarray:
    """``n`` codes of ``bits`` (1..8) bits each from ``buf``, as uint8 (one byte per code, nothing bigger)."""
    return _unpack(np.frombuffer(buf, dtype=np.uint8), bits, n)


def _unpack(src: np.ndarray, bits: int, n: int) -> np.ndarray:
    if not 1 <= bits <= 8:
        raise ValueError(f"codes of {bits} bits")
    if src.size * 8 < n * bits:
        raise ValueError(f"{src.size} bytes hold fewer than {n} codes of {bits} bits")
    if bits == 8:
        return src[:n].copy()
    out = np.empty(n, dtype=np.uint8)
    for a in range(0, n, _CHUNK):  # _CHUNK is a multiple of 8: every chunk starts on a byte
        m = min(_CHUNK, n - a)
        planes = np.unpackbits(src[a * bits // 8:], count=m * bits, bitorder="little").reshape(m, bits)
        out[a:a + m] = np.packbits(planes, axis=1, bitorder="little")[:, 0]
    return out


def relative_gaps(positions: np.ndarray, rbits: int) -> np.ndarray:
    """Deep Compression's relative indices: gap-1 to the previous non-zero in ``rbits`` bits; a gap that
    does not fit emits filler entries of value 2**rbits-1 (each advancing that far, holding no weight)."""
    full = (1 << rbits) - 1
    v = np.diff(np.concatenate([[-1], positions])) - 1
    fillers = v // full
    out = np.full(int(fillers.sum()) + v.size, full, dtype=np.int64)
    ends = np.cumsum(fillers + 1) - 1  # each real entry follows its fillers
    out[ends] = v % full
    return out


def positions_from_gaps(gaps: np.ndarray, rbits: int) -> np.ndarray:
    """Positions of the real entries among ``gaps`` (fillers skipped); ``decode_tensor`` does the same a
    chunk at a time (``_scatter_relative``)."""
    full = (1 << rbits) - 1
    gaps = np.asarray(gaps, dtype=np.int64)
    real = gaps != full
    pos = np.cumsum(np.where(real, gaps + 1, full)) - 1
    return pos[real]


def _relative_entries(positions: np.ndarray, rbits: int) -> int:
    v = np.diff(np.concatenate([[-1], positions])) - 1
    return int((v // ((1 << rbits) - 1)).sum()) + v.size


# -- encoding one tensor -------------------------------------------------------------------------------------

def _bit_view(t: torch.Tensor) -> np.ndarray:
    """The tensor's elements as unsigned integers of their own width (exact, whatever the dtype)."""
    size = t.element_size()
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().view(f"<u{size}")


def _index_bits(k: int) -> int:
    return max(1, math.ceil(math.log2(k))) if k > 1 else 1


def _candidates(t: torch.Tensor):
    """Every applicable (description, streams) of one tensor; streams: role -> raw bytes."""
    bits = _bit_view(t)
    nz = bits != 0
    positions = np.flatnonzero(nz)
    value_sets = {"dense": bits, "sparse": bits[nz]}
    zero_modes: dict[str, tuple[dict, bytes | None]] = {"dense": ({}, None)}
    if positions.size < bits.size:
        zero_modes["bitmask"] = ({}, np.packbits(nz, bitorder="little").tobytes())
        if positions.size:
            r = min(range(1, 9), key=lambda r: _relative_entries(positions, r) * r)
            gaps = relative_gaps(positions, r)
            zero_modes["relative"] = ({"rbits": r, "entries": int(gaps.size)}, pack_bits(gaps, r))
    for zmode, (zfacts, index) in zero_modes.items():
        vals = value_sets["dense" if zmode == "dense" else "sparse"]
        streams = {"index": index} if index is not None else {}
        yield {"sparse": zmode, "values": "raw", **zfacts}, {**streams, "values": vals.tobytes()}
        if t.dtype != torch.bool and vals.size:  # int8 weights of a clustered model: a few distinct values too
            book, codes = np.unique(vals, return_inverse=True)
            if book.size <= MAX_CODEBOOK:
                b = _index_bits(book.size)
                yield ({"sparse": zmode, "values": "codebook", "k": int(book.size), "bits": b, **zfacts},
                       {**streams, "codebook": book.tobytes(), "values": pack_bits(codes, b)})


def encode_tensor(t: torch.Tensor) -> tuple[dict, list[tuple[str, str, bytes, int]]]:
    """(entry, [(role, coder, coded bytes, raw length)]) of the smallest encoding of ``t``."""
    if t.dtype not in DTYPE_NAMES:
        raise CompressError(f"cannot pack a tensor of dtype {t.dtype}")
    best = None
    for desc, streams in _candidates(t):
        coded = [(role, *_best_coded(raw), len(raw)) for role, raw in streams.items()]
        size = sum(len(c[2]) for c in coded)
        if best is None or size < best[0]:
            best = (size, desc, coded)
    _, desc, coded = best
    nnz = int(np.count_nonzero(_bit_view(t)))
    entry = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "nnz": nnz, **desc}
    return entry, coded


# -- decoding one tensor ---------------------------------------------------------------------------------------

def _nat(x: Any) -> bool:
    """A JSON integer >= 0 (not a bool, not a float)."""
    return type(x) is int and x >= 0


def _short(x: Any, n: int = 60) -> str:
    """``repr(x)`` cut to ``n`` characters: a crafted name or value must not make an error line of megabytes."""
    r = repr(x)
    return r if len(r) <= n else r[:n] + "..."


def _expected_lengths(e: dict, numel: int, size: int) -> dict[str, int]:
    """Decoded byte length of every stream, from the entry's own numbers (checked before decoding)."""
    n_vals = numel if e["sparse"] == "dense" else e["nnz"]
    out: dict[str, int] = {}
    if e["sparse"] == "bitmask":
        out["index"] = (numel + 7) // 8
    elif e["sparse"] == "relative":
        out["index"] = (e["entries"] * e["rbits"] + 7) // 8
    if e["values"] == "codebook":
        out["codebook"] = e["k"] * size
        out["values"] = (n_vals * e["bits"] + 7) // 8
    else:
        out["values"] = n_vals * size
    return out


def _check_entry(e: Any, where: str) -> tuple[torch.dtype, int]:
    """(dtype, number of entries) of a well-formed tensor entry; a one-line error otherwise. Nothing decoded."""
    shape = e.get("shape") if isinstance(e, dict) else None
    if not isinstance(e, dict) or not isinstance(e.get("dtype"), str) or e["dtype"] not in DTYPES \
            or not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_nat(d) for d in shape) \
            or e.get("sparse") not in ("dense", "bitmask", "relative") or e.get("values") not in ("raw", "codebook") \
            or type(e.get("nnz")) is not int or not isinstance(e.get("streams"), list):
        raise CompressError(f"{where}: malformed tensor entry")
    dtype = DTYPES[e["dtype"]]
    numel = math.prod(shape)
    size = dtype.itemsize
    if numel * size > MAX_TENSOR_BYTES or not 0 <= e["nnz"] <= numel:
        raise CompressError(f"{where}: implausible sizes (shape {_short(shape)}, {e['nnz']} non-zeros)")
    ints = {"relative": ("rbits", "entries"), "codebook": ("k", "bits")}
    for key in ints.get(e["sparse"], ()) + ints.get(e["values"], ()):
        if not _nat(e.get(key)):
            raise CompressError(f"{where}: malformed tensor entry ({key})")
    if e["values"] == "codebook" and not (1 <= e["bits"] <= 8 and 1 <= e["k"] <= min(MAX_CODEBOOK, 1 << e["bits"])):
        raise CompressError(f"{where}: codebook of {e['k']} entries at {e['bits']} bits")
    if e["sparse"] == "relative" and not (1 <= e["rbits"] <= 8 and e["nnz"] <= e["entries"] <= numel):
        raise CompressError(f"{where}: relative index of {e['entries']} entries at {e['rbits']} bits")
    return dtype, numel


def _check_streams(e: dict, numel: int, size: int, payload_len: int, where: str) -> dict[str, dict]:
    """Role -> stream of a checked entry: each one of the roles its encoding needs, its decoded length the one
    the entry's numbers give, its bytes inside the payload. Nothing decoded."""
    want = _expected_lengths(e, numel, size)
    streams: dict[str, dict] = {}
    for i, s in enumerate(e["streams"]):
        role = s.get("role") if isinstance(s, dict) else None
        if not isinstance(role, str) or role not in want or role in streams or not isinstance(s.get("coder"), str) \
                or s["coder"] not in CODERS or not _nat(s.get("raw")) or s["raw"] != want[role] \
                or not _nat(s.get("offset")) or not _nat(s.get("length")) or s["offset"] + s["length"] > payload_len:
            raise CompressError(f"{where}: stream {_short(role) if isinstance(role, str) else '#' + str(i)} does not fit the file")
        streams[role] = s
    if set(streams) != set(want):
        raise CompressError(f"{where}: streams {sorted(streams)} given, expected {sorted(want)}")
    return streams


def _scatter_bitmask(out: np.ndarray, vals: np.ndarray, index: np.ndarray, where: str) -> None:
    """``out[i] = next value`` for every set bit i of the mask, a chunk of the mask at a time."""
    k = 0
    for a in range(0, out.size, _CHUNK):  # _CHUNK is a multiple of 8: every chunk starts on a byte
        m = min(_CHUNK, out.size - a)
        pos = np.flatnonzero(np.unpackbits(index[a // 8:(a + m + 7) // 8], count=m, bitorder="little"))
        if k + pos.size > vals.size:
            break
        out[a + pos] = vals[k:k + pos.size]
        k += pos.size
    else:
        if k == vals.size:
            return
    raise CompressError(f"{where}: sparse index does not match {vals.size} non-zeros in {out.size} entries")


def _scatter_relative(out: np.ndarray, vals: np.ndarray, index: np.ndarray, rbits: int, entries: int, where: str) -> None:
    """Deep Compression's relative index (gaps, fillers) to positions, a chunk of entries at a time."""
    full = (1 << rbits) - 1
    base, k = -1, 0
    for a in range(0, entries, _CHUNK):
        m = min(_CHUNK, entries - a)
        gaps = _unpack(index[a * rbits // 8:], rbits, m).astype(np.int64)
        real = gaps != full
        ends = np.cumsum(np.where(real, gaps + 1, full)) + base
        base = int(ends[-1])
        pos = ends[real]
        if (pos.size and pos[-1] >= out.size) or k + pos.size > vals.size:
            break
        out[pos] = vals[k:k + pos.size]
        k += pos.size
    else:
        if k == vals.size:
            return
    raise CompressError(f"{where}: sparse index does not match {vals.size} non-zeros in {out.size} entries")


def _decode_stream(s: dict, payload: memoryview, where: str):
    """The decoded bytes of a checked stream: exactly its declared length (decoders stop one byte past it)."""
    raw = CODERS[s["coder"]][1](payload[s["offset"]:s["offset"] + s["length"]], s["raw"])
    if len(raw) != s["raw"]:
        raise CompressError(f"{where}: stream {s['role']} decodes to {len(raw)}{'+' if len(raw) > s['raw'] else ''} "
                            f"bytes, expected {s['raw']}")
    return raw


def decode_tensor(e: dict, payload: memoryview, where: str) -> torch.Tensor:
    """One tensor of a packed file. Memory: its streams decoded, the tensor, and a few MiB of index work."""
    dtype, numel = _check_entry(e, where)
    size = dtype.itemsize
    streams = _check_streams(e, numel, size, len(payload), where)
    raw = {role: _decode_stream(s, payload, where) for role, s in streams.items()}
    if not numel:
        return torch.empty(e["shape"], dtype=dtype)
    udt = np.dtype(f"<u{size}")
    if e["values"] == "codebook":
        book = np.frombuffer(raw.pop("codebook"), dtype=udt)
        codes = unpack_bits(raw.pop("values"), e["bits"], numel if e["sparse"] == "dense" else e["nnz"])
        if codes.size and int(codes.max()) >= book.size:
            raise CompressError(f"{where}: codebook index out of range")
        vals = book[codes]  # a new array: the tensor itself when dense
        del codes
    else:
        vals = np.frombuffer(raw.pop("values"), dtype=udt)
    if e["sparse"] == "dense":
        out = vals if vals.flags.writeable else vals.copy()  # a bytearray of our own, or book[codes]
    else:
        out = np.zeros(numel, dtype=udt)
        index = np.frombuffer(raw.pop("index"), dtype=np.uint8)
        if e["sparse"] == "bitmask":
            _scatter_bitmask(out, vals, index, where)
        else:
            _scatter_relative(out, vals, index, e["rbits"], e["entries"], where)
    del vals
    if dtype == torch.bool and out.size and int(out.max()) > 1:
        raise CompressError(f"{where}: a bool tensor holds bytes other than 0 and 1")
    return torch.from_numpy(out.view(np.uint8)).view(dtype).reshape(e["shape"])


# -- files -----------------------------------------------------------------------------------------------------

def _plain(obj: Any, what: str) -> Any:
    try:
        return json.loads(json.dumps(obj))
    except (TypeError, ValueError) as exc:
        raise CompressError(f"cannot pack: the model's {what} is not plain data ({exc})") from None


def _add_tensor(payload: bytearray, name: str, t: torch.Tensor) -> tuple[dict, dict]:
    """Encode ``t`` onto the end of ``payload``: (its header entry, its stats line)."""
    entry, coded = encode_tensor(t)
    entry["name"] = name
    entry["streams"] = []
    for role, coder, data, raw_len in coded:
        entry["streams"].append({"role": role, "coder": coder, "offset": len(payload), "length": len(data), "raw": raw_len})
        payload += data
    stats = {"name": name, "numel": t.numel(), "ndim": t.ndim, "nnz": entry["nnz"], "sparse": entry["sparse"],
             "values": entry["values"], "bits": entry.get("bits"), "rbits": entry.get("rbits"),
             "bytes": sum(len(c[2]) for c in coded), "raw_bytes": t.numel() * t.element_size(),
             "coders": {c[0]: c[1] for c in coded}}
    return entry, stats


def _assemble(head: bytes, payload: bytes | bytearray) -> bytes:
    """A version-2 file of a deflated header and a payload: the prefix with both lengths and the CRC-32 of
    everything after the CRC (lengths, header, payload), so that any flipped bit is caught on reading."""
    lengths = struct.pack("<IQ", len(head), len(payload))
    crc = zlib.crc32(payload, zlib.crc32(head, zlib.crc32(lengths)))
    return b"".join([MAGIC, struct.pack("<HI", VERSION, crc), lengths, head, payload])


def _file(header: dict, payload: bytearray) -> bytes:
    header = {"format": FORMAT, **header}
    return _assemble(zlib.compress(json.dumps(header, separators=(",", ":")).encode(), 9), payload)


def pack_state(ckpt: dict) -> tuple[bytes, dict]:
    """(file bytes, stats) of a checkpoint dict (``compress.checkpoint_io.model_state``)."""
    payload = bytearray()
    tensors, stats = [], []
    for name, t in ckpt["state_dict"].items():
        entry, line = _add_tensor(payload, name, t)
        tensors.append(entry)
        stats.append(line)
    header = {"spec": _plain(ckpt.get("spec"), "spec"), "io": _plain(ckpt.get("io"), "io"),
              "transforms": _plain(ckpt.get("transforms", []), "transforms"), "meta": _plain(ckpt.get("meta", {}), "meta"),
              "tensors": tensors}
    return _file(header, payload), {"tensors": stats}


# -- ONNX models (an int8 PTQ file): the initializers packed as tensors, the rest of the graph as one stream ------

_ONNX_DATA_FIELDS = ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data")
# ONNX element types stored as tensors; any other (bfloat16, float8, int4: ml_dtypes arrays that torch cannot
# take; strings) stays in the graph stream as it is, so the model still reads back to the same bytes.
_ONNX_PACKED_TYPES = ("FLOAT", "DOUBLE", "FLOAT16", "INT64", "INT32", "INT16", "INT8", "UINT8", "BOOL")


def pack_onnx_state(model_bytes: bytes, meta: dict | None = None, where: str = "ONNX model") -> tuple[bytes, dict]:
    """(file bytes, stats) of a serialized ONNX model: every numeric initializer is stored like a state_dict
    tensor (an int8 weight gets a sparse index and, with few distinct values, a codebook; then entropy
    coding), and the graph without their data as one more byte stream. Read back, the model serializes to
    the same bytes (``read_packed(...)["onnx"]``). ``where`` names the model in one-line errors."""
    import onnx
    from onnx import numpy_helper

    try:
        model = onnx.ModelProto.FromString(model_bytes)
    except Exception as exc:  # protobuf's DecodeError (and others) on a file that is not ONNX
        raise CompressError(f"{where}: not an ONNX model ({type(exc).__name__})") from None
    refuse_external_data(model, where, "cannot be packed")
    payload = bytearray()
    tensors, stats = [], []
    for i, init in enumerate(model.graph.initializer):
        known = init.data_type in onnx.TensorProto.DataType.values()
        if not known or onnx.TensorProto.DataType.Name(init.data_type) not in _ONNX_PACKED_TYPES:
            continue  # stays in the graph stream as it is (an unknown type is ONNX Runtime's to refuse)
        try:
            arr = numpy_helper.to_array(init)
        except Exception as exc:  # data that does not fit its dims or type: ValueError and others from numpy
            raise CompressError(f"{where}: initializer {_short(init.name or i)} is malformed "
                                f"({error_line(exc)})") from None
        t = torch.from_numpy(np.ascontiguousarray(arr).copy()) if arr.dtype != np.float16 else \
            torch.from_numpy(arr.view(np.int16).copy()).view(torch.float16)
        entry, line = _add_tensor(payload, init.name or f"#{i}", t)
        entry.update(initializer=i, raw=init.HasField("raw_data"))
        tensors.append(entry)
        stats.append(line)
        for f in _ONNX_DATA_FIELDS:
            init.ClearField(f)
    graph = np.frombuffer(model.SerializeToString(), dtype=np.uint8)
    g_entry, g_line = _add_tensor(payload, "onnx graph", torch.from_numpy(graph.copy()))
    stats.append({**g_line, "ndim": 0})
    return _file({"onnx": g_entry, "io": None, "meta": _plain(meta or {}, "meta"), "tensors": tensors}, payload), \
        {"tensors": stats}


def refuse_external_data(model, where, why: str) -> None:
    """Refuse an ONNX model any of whose tensors (initializers, sparse initializers, node attributes,
    subgraphs) keeps its data in an external file: ONNX Runtime would read that file when the model loads."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors  # the walk onnx itself uses to save external data

    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in _get_all_tensors(model)):
        raise CompressError(f"{where}: keeps tensor data in external files, which {why}; save the model as one "
                            "file (onnx.save(model, path, save_as_external_data=False))")


def _onnx_back(header: dict, payload: memoryview, path: Path) -> bytes:
    """The serialized ONNX model of a packed file made by ``pack_onnx_state``."""
    import onnx
    from onnx import helper

    graph = decode_tensor(header["onnx"], payload, f"{path}: ONNX graph")
    try:
        model = onnx.ModelProto.FromString(graph.numpy().tobytes())
    except Exception as exc:  # protobuf's DecodeError on a damaged stream
        raise CompressError(f"{path}: corrupt packed file (its ONNX graph does not parse: {type(exc).__name__})") from None
    # A crafted graph could name a file in the loading process's folder as a tensor's data: never let it.
    refuse_external_data(model, path, "is refused in a packed file (ONNX Runtime would read files from the working folder)")
    inits = model.graph.initializer
    for e in header["tensors"]:
        where = f"{path}: initializer {_short(e.get('name'))}" if isinstance(e, dict) else str(path)
        i = e.get("initializer") if isinstance(e, dict) else None
        if not _nat(i) or i >= len(inits):
            raise CompressError(f"{where}: corrupt packed file (no such initializer)")
        t = decode_tensor(e, payload, where)
        arr = (t.view(torch.int16).numpy().view(np.float16) if t.dtype == torch.float16 else t.numpy()).reshape(-1)
        if e.get("raw", True):
            inits[i].raw_data = arr.astype(arr.dtype.newbyteorder("<")).tobytes()
        else:  # the typed field it came in (float_data, int32_data, ...), as onnx.helper writes it
            filled = helper.make_tensor("", inits[i].data_type, [arr.size], arr, raw=False)
            field = helper.tensor_dtype_to_field(inits[i].data_type)
            getattr(inits[i], field).extend(getattr(filled, field))
    return model.SerializeToString()


def pack_model(model: nn.Module, path: str | Path, meta: dict | None = None) -> dict:
    """Write ``model`` packed to ``path``; returns per-tensor stats and totals (``summary``)."""
    from compress.checkpoint_io import model_state

    blob, stats = pack_state(model_state(model, meta))
    path = Path(path)
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(blob)
    return {"bytes": len(blob), **summary(stats["tensors"]), "tensors": stats["tensors"]}


def pack_onnx(src: str | Path, path: str | Path, meta: dict | None = None) -> dict:
    """Write the ONNX model ``src`` packed to ``path`` (``pack_onnx_state``); stats as ``pack_model``'s."""
    src = Path(src)
    if not src.is_file():
        raise CompressError(f"{src}: no such ONNX file")
    blob, stats = pack_onnx_state(src.read_bytes(), meta, where=str(src))
    with atomic_path(Path(path)) as tmp:
        Path(tmp).write_bytes(blob)
    return {"bytes": len(blob), **summary(stats["tensors"]), "tensors": stats["tensors"]}


def summary(tensors: list[dict]) -> dict:
    """Bits per weight of the weight tensors (2-D and up) overall and per non-zero, and which coders won."""
    w = [s for s in tensors if "weight" in s["name"] and s["numel"] > 0 and s.get("ndim", 2) >= 2]  # ONNX: "fc.weight_quantized"
    wbytes = sum(s["bytes"] for s in w)
    n, nnz = sum(s["numel"] for s in w), sum(s["nnz"] for s in w)
    coders: dict[str, int] = {}
    for s in tensors:
        for c in s["coders"].values():
            coders[c] = coders.get(c, 0) + 1
    return {"weight_bits_per_weight": round(8 * wbytes / n, 3) if n else None,
            "weight_bits_per_nonzero": round(8 * wbytes / nnz, 3) if nnz else None, "coders": coders}


def is_packed(path: str | Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


# -- reading: prefix, CRC and the whole header checked (every tensor's size against the limit) before any
# tensor is decoded -----------------------------------------------------------------------------------------------

def _fmt(n: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def _parse_bytes(text: str) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(?:i?[bB])?", text.strip())
    if not m:
        raise CompressError(f"{UNPACK_ENV}={text!r}: expected a number of bytes, e.g. 4000000000 or 4G")
    return int(float(m[1]) * 1024 ** " kmgt".index(m[2].lower() or " "))


def unpack_limit(file_size: int, max_bytes: int | None = None) -> tuple[int, str]:
    """(bytes a model file of ``file_size`` bytes may unpack to, what set that number): ``max_bytes`` when
    given, else ``COMPRESS_MAX_UNPACK_BYTES`` (bytes, or with a K/M/G/T suffix), else UNPACK_FLOOR +
    UNPACK_RATIO x the file's size. It bounds both the tensors a packed file declares and what the model its
    spec builds allocates (``compress.checkpoint.load_model``)."""
    if max_bytes is not None:
        return int(max_bytes), f"max_bytes={int(max_bytes)}"
    env = os.environ.get(UNPACK_ENV, "").strip()
    if env:
        return _parse_bytes(env), f"{UNPACK_ENV}={env}"
    return UNPACK_FLOOR + UNPACK_RATIO * file_size, f"64 MiB + {UNPACK_RATIO}x its {_fmt(file_size)}"


def over_limit(path: str | Path, what: str, need: int | None, limit: tuple[int, str]) -> CompressError:
    """The one line for a file over its unpack limit (``need``: None when stopped before the total is known)."""
    take = f"{_fmt(need)}, more than" if need is not None else "more than"
    return CompressError(f"{path}: {what} would take {take} the {_fmt(limit[0])} this file may unpack to ({limit[1]}); "
                         f"if you trust the file, raise the limit with {UNPACK_ENV} (bytes, e.g. 8G)")


def _depth(obj: Any) -> int:
    """How deep ``obj``'s lists and dicts nest, counted without recursion (stops past MAX_DEPTH)."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if isinstance(o, (dict, list)):
            deepest = max(deepest, d)
            if d > MAX_DEPTH:
                break
            stack.extend((v, d + 1) for v in (o.values() if isinstance(o, dict) else o))
    return deepest


def _read_header(head: memoryview, path: Path) -> dict:
    cap = min(MAX_HEADER, HEADER_FLOOR + HEADER_RATIO * len(head))
    try:
        text = _zlib_d(head, cap)
        if len(text) > cap:
            raise CompressError(f"{path}: corrupt packed file (its {_fmt(len(head))} header inflates past {_fmt(cap)})")
        header = json.loads(text)
    except (UnicodeDecodeError, ValueError, zlib.error):
        raise CompressError(f"{path}: corrupt packed file (header is not valid deflated JSON)") from None
    except RecursionError:
        raise CompressError(f"{path}: corrupt packed file (header nested too deep)") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT or not isinstance(header.get("tensors"), list):
        raise CompressError(f"{path}: corrupt packed file (header lacks its format or tensors)")
    if _depth(header) > MAX_DEPTH:
        raise CompressError(f"{path}: corrupt packed file (header nested over {MAX_DEPTH} deep)")
    return header


class Packed:
    """A packed file whose prefix, CRC and header have been checked, every tensor entry and stream included,
    and the tensors' total size against ``unpack_limit``. Nothing is decoded until ``state_dict``,
    ``onnx_bytes`` or ``checkpoint`` is called."""

    def __init__(self, path: Path, header: dict, payload: memoryview, limit: tuple[int, str]):
        self.path, self.header, self.payload, self.limit = path, header, payload, limit
        self.is_onnx = "onnx" in header
        where = [(e, f"{path}: {'initializer' if self.is_onnx else 'tensor'} {_short(e.get('name'))}")
                 for e in header["tensors"]]
        if self.is_onnx:
            where.append((header["onnx"], f"{path}: ONNX graph"))
        names: set[str] = set()
        self.nbytes = 0  # what the tensors take decoded
        for i, (e, w) in enumerate(where):
            if not isinstance(e, dict) or not isinstance(e.get("name"), str):
                raise CompressError(f"{path}: corrupt packed file (tensor {i} has no name)")
            if e["name"] in names and not self.is_onnx:
                raise CompressError(f"{w}: corrupt packed file (the name comes twice)")
            names.add(e["name"])
            dtype, numel = _check_entry(e, w)
            _check_streams(e, numel, dtype.itemsize, len(payload), w)
            self.nbytes += numel * dtype.itemsize
        if self.nbytes > limit[0]:
            raise over_limit(path, f"its {len(where)} tensor{'s' if len(where) != 1 else ''}", self.nbytes, limit)

    def meta_state_dict(self) -> dict[str, torch.Tensor]:
        """The declared tensors on the meta device (dtype and shape, no data): what a model built from the
        spec must take, checked before anything is allocated."""
        return {e["name"]: torch.empty(e["shape"], dtype=DTYPES[e["dtype"]], device="meta") for e in self.header["tensors"]}

    def state_dict(self) -> dict[str, torch.Tensor]:
        sd = {}
        for e in self.header["tensors"]:
            name = _short(e["name"])
            try:
                sd[e["name"]] = decode_tensor(e, self.payload, f"{self.path}: tensor {name}")
            except CompressError:
                raise
            except Exception as exc:  # numpy/decoder errors on crafted input: still one line
                raise CompressError(f"{self.path}: corrupt packed file at tensor {name} ({type(exc).__name__})") from None
        return sd

    def onnx_bytes(self) -> bytes:
        try:
            return _onnx_back(self.header, self.payload, self.path)
        except CompressError:
            raise
        except Exception as exc:  # onnx/numpy errors on crafted input: still one line
            raise CompressError(f"{self.path}: corrupt packed file ({type(exc).__name__} rebuilding its ONNX model)") from None

    def checkpoint(self) -> dict:
        """A checkpoint dict (format, spec, io, transforms, state_dict, meta), or for a packed ONNX model
        ``{"format": ONNX_FORMAT, "onnx": model bytes, "io", "meta"}``."""
        from compress.checkpoint_io import FORMAT as CKPT_FORMAT

        h = self.header
        if self.is_onnx:
            return {"format": ONNX_FORMAT, "onnx": self.onnx_bytes(), "io": h.get("io"), "meta": h.get("meta") or {}}
        return {"format": CKPT_FORMAT, "spec": h.get("spec"), "io": h.get("io"), "transforms": h.get("transforms") or [],
                "state_dict": self.state_dict(), "meta": h.get("meta") or {}}


def open_packed(path: str | Path, max_bytes: int | None = None) -> Packed:
    """Read and check a packed file (``Packed``); a one-line ``CompressError`` for a truncated, damaged (CRC),
    crafted or foreign file, or one that would unpack to more than ``unpack_limit(size, max_bytes)``."""
    path = Path(path)
    try:
        blob = memoryview(path.read_bytes())
    except OSError as exc:
        raise CompressError(f"{path}: cannot read it ({exc.strerror or type(exc).__name__})") from None
    limit = unpack_limit(len(blob), max_bytes)
    if len(blob) < 6 or bytes(blob[:4]) != MAGIC:
        raise CompressError(f"{path}: not a packed compress model (no CMPK header)")
    (version,) = struct.unpack_from("<H", blob, 4)
    crc = plen = None
    if version == VERSION:
        if len(blob) < _PREFIX.size:
            raise CompressError(f"{path}: truncated packed file ({len(blob)} bytes)")
        _, _, crc, hlen, plen = _PREFIX.unpack_from(blob)
        start = _PREFIX.size
    elif version == 1:  # the first format: no CRC; the payload's length is in the header
        if len(blob) < 10:
            raise CompressError(f"{path}: truncated packed file ({len(blob)} bytes)")
        (hlen,) = struct.unpack_from("<I", blob, 6)
        start = 10
    else:
        raise CompressError(f"{path}: packed format version {version}; this compress reads versions 1 and {VERSION}")
    if start + hlen > len(blob):
        raise CompressError(f"{path}: truncated packed file (header of {hlen} bytes, file of {len(blob)})")
    if plen is not None and start + hlen + plen != len(blob):
        raise CompressError(f"{path}: truncated or padded packed file (payload of {len(blob) - start - hlen} bytes, "
                            f"its prefix says {plen})")
    if crc is not None and zlib.crc32(blob[10:]) != crc:
        raise CompressError(f"{path}: corrupt packed file (CRC-32 mismatch: damaged since it was written; "
                            "copy or pack it again)")
    header = _read_header(blob[start:start + hlen], path)
    payload = blob[start + hlen:]
    if version == 1 and header.get("payload_length") != len(payload):
        raise CompressError(f"{path}: truncated or padded packed file (payload of {len(payload)} bytes, "
                            f"header says {_short(header.get('payload_length'))})")
    return Packed(path, header, payload, limit)


def read_packed(path: str | Path, max_bytes: int | None = None) -> dict:
    """A checkpoint dict (format, spec, io, transforms, state_dict, meta) from a packed file, or for a
    packed ONNX model ``{"format": ONNX_FORMAT, "onnx": model bytes, ...}``; a one-line ``CompressError``
    for a truncated, corrupt, crafted or foreign file (``open_packed``)."""
    return open_packed(path, max_bytes).checkpoint()
