"""The packed model file (``.cpk``): Deep Compression's storage (sparse indices, codebook indices at their
bit width, entropy coding) for any model the tool saves, read back bit-exact by ``compress.load_model``.

Layout: ``b"CMPK"`` | version (uint16 LE) | header length (uint32 LE) | header (UTF-8 JSON, deflated:
tensor names and offsets are a third of a small model's file otherwise) | payload.
The header is plain data: the model spec, io, recorded transforms and meta as in a checkpoint, and one
entry per state_dict tensor naming its dtype, shape, encoding and byte streams (offset, length, coder,
decoded length) in the payload. Nothing is unpickled; every length is checked against the tensor's shape
and the file before anything is decoded, and decoders are capped at the declared length.

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

import io
import json
import lzma
import math
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from compress.errors import CompressError
from compress.utils import atomic_path

MAGIC = b"CMPK"
VERSION = 1
FORMAT = "compress.packed/1"
ONNX_FORMAT = "compress.packed-onnx/1"  # what read_packed returns for a packed ONNX model (its bytes under "onnx")
MAX_TENSOR_BYTES = 1 << 36  # a header claiming more than this for one tensor is refused before decoding
MAX_CODEBOOK = 256
MAX_HEADER = 64 << 20  # decoded header bytes

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

    reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(b))
    out = bytearray()
    while len(out) <= limit:  # reads grow with the real output, never with a claimed size
        chunk = reader.read(min(1 << 20, limit + 1 - len(out)))
        if not chunk:
            break
        out += chunk
    return bytes(out)


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


def unpack_bits(buf: bytes, bits: int, n: int) -> np.ndarray:
    planes = np.unpackbits(np.frombuffer(buf, dtype=np.uint8), count=n * bits, bitorder="little")
    return (planes.reshape(n, bits).astype(np.int64) << np.arange(bits)).sum(axis=1)


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
    full = (1 << rbits) - 1
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
    if not isinstance(e, dict) or e.get("dtype") not in DTYPES or not isinstance(e.get("shape"), list) \
            or not all(isinstance(d, int) and d >= 0 for d in e["shape"]) or e.get("sparse") not in ("dense", "bitmask", "relative") \
            or e.get("values") not in ("raw", "codebook") or not isinstance(e.get("nnz"), int) \
            or not isinstance(e.get("streams"), list):
        raise CompressError(f"{where}: malformed tensor entry")
    dtype = DTYPES[e["dtype"]]
    numel = math.prod(e["shape"])
    size = torch.empty((), dtype=dtype).element_size()
    if numel * size > MAX_TENSOR_BYTES or not 0 <= e["nnz"] <= numel:
        raise CompressError(f"{where}: implausible sizes (shape {e['shape']}, {e['nnz']} non-zeros)")
    ints = {"relative": ("rbits", "entries"), "codebook": ("k", "bits")}
    for key in ints.get(e["sparse"], ()) + ints.get(e["values"], ()):
        if not isinstance(e.get(key), int) or e[key] < 0:
            raise CompressError(f"{where}: malformed tensor entry ({key})")
    if e["values"] == "codebook" and not (1 <= e["bits"] <= 8 and 1 <= e["k"] <= MAX_CODEBOOK):
        raise CompressError(f"{where}: codebook of {e['k']} entries at {e['bits']} bits")
    if e["sparse"] == "relative" and not (1 <= e["rbits"] <= 8 and e["entries"] <= numel):
        raise CompressError(f"{where}: relative index of {e['entries']} entries at {e['rbits']} bits")
    return dtype, numel


def decode_tensor(e: dict, payload: memoryview, where: str) -> torch.Tensor:
    dtype, numel = _check_entry(e, where)
    size = torch.empty((), dtype=dtype).element_size()
    want = _expected_lengths(e, numel, size)
    streams: dict[str, bytes] = {}
    for s in e["streams"]:
        if not isinstance(s, dict) or s.get("role") not in want or s.get("coder") not in CODERS \
                or s.get("raw") != want[s["role"]] or not isinstance(s.get("offset"), int) \
                or not isinstance(s.get("length"), int) or s["offset"] < 0 or s["length"] < 0 \
                or s["offset"] + s["length"] > len(payload):
            raise CompressError(f"{where}: stream {s.get('role') if isinstance(s, dict) else s!r} does not fit the file")
        raw = CODERS[s["coder"]][1](bytes(payload[s["offset"]:s["offset"] + s["length"]]), s["raw"])
        if len(raw) != s["raw"]:
            raise CompressError(f"{where}: stream {s['role']} decodes to {len(raw)} bytes, expected {s['raw']}")
        streams[s["role"]] = raw
    if set(streams) != set(want):
        raise CompressError(f"{where}: streams {sorted(streams)} given, expected {sorted(want)}")
    udt = f"<u{size}"
    n_vals = numel if e["sparse"] == "dense" else e["nnz"]
    if e["values"] == "codebook":
        book = np.frombuffer(streams["codebook"], dtype=udt)
        codes = unpack_bits(streams["values"], e["bits"], n_vals)
        if codes.size and codes.max() >= book.size:
            raise CompressError(f"{where}: codebook index out of range")
        vals = book[codes]
    else:
        vals = np.frombuffer(streams["values"], dtype=udt)
    if e["sparse"] == "dense":
        out = vals
    else:
        if e["sparse"] == "bitmask":
            mask = np.unpackbits(np.frombuffer(streams["index"], dtype=np.uint8), count=numel, bitorder="little")
            pos = np.flatnonzero(mask)
        else:
            pos = positions_from_gaps(unpack_bits(streams["index"], e["rbits"], e["entries"]), e["rbits"])
        if pos.size != n_vals or (pos.size and (pos[-1] >= numel or np.any(np.diff(pos) <= 0))):
            raise CompressError(f"{where}: sparse index does not match {n_vals} non-zeros in {numel} entries")
        out = np.zeros(numel, dtype=udt)
        out[pos] = vals
    return torch.frombuffer(bytearray(out.astype(udt).tobytes()), dtype=torch.uint8).view(dtype).reshape(e["shape"]) \
        if numel else torch.empty(e["shape"], dtype=dtype)


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


def _file(header: dict, payload: bytearray) -> bytes:
    header = {"format": FORMAT, **header, "payload_length": len(payload)}
    head = zlib.compress(json.dumps(header, separators=(",", ":")).encode(), 9)
    return MAGIC + struct.pack("<HI", VERSION, len(head)) + head + bytes(payload)


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
    if any(init.data_location == onnx.TensorProto.EXTERNAL for init in model.graph.initializer):
        # the packed file would point at data files beside the source; save the model as one file first
        raise CompressError(f"{where}: keeps its weights in external data files, which cannot be packed; "
                            "save it as a single .onnx file (onnx.save(model, path, save_as_external_data=False))")
    payload = bytearray()
    tensors, stats = [], []
    for i, init in enumerate(model.graph.initializer):
        if onnx.TensorProto.DataType.Name(init.data_type) not in _ONNX_PACKED_TYPES:
            continue  # stays in the graph stream as it is
        arr = numpy_helper.to_array(init)
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


def _onnx_back(header: dict, payload: memoryview, path: Path) -> bytes:
    """The serialized ONNX model of a packed file made by ``pack_onnx_state``."""
    import onnx
    from onnx import helper

    graph = decode_tensor(header["onnx"], payload, f"{path}: ONNX graph")
    try:
        model = onnx.ModelProto.FromString(graph.numpy().tobytes())
    except Exception as exc:  # protobuf's DecodeError on a damaged stream
        raise CompressError(f"{path}: corrupt packed file (its ONNX graph does not parse: {type(exc).__name__})") from None
    inits = model.graph.initializer
    for e in header["tensors"]:
        where = f"{path}: initializer {e.get('name')!r}" if isinstance(e, dict) else str(path)
        i = e.get("initializer") if isinstance(e, dict) else None
        if not isinstance(i, int) or not 0 <= i < len(inits):
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


def read_packed(path: str | Path) -> dict:
    """A checkpoint dict (format, spec, io, transforms, state_dict, meta) from a packed file, or for a
    packed ONNX model ``{"format": ONNX_FORMAT, "onnx": model bytes, ...}``; a one-line ``CompressError``
    for a truncated, corrupt or foreign file."""
    from compress.checkpoint_io import FORMAT as CKPT_FORMAT

    path = Path(path)
    blob = memoryview(path.read_bytes())
    if len(blob) < 10 or bytes(blob[:4]) != MAGIC:
        raise CompressError(f"{path}: not a packed compress model (no CMPK header)")
    version, hlen = struct.unpack("<HI", blob[4:10])
    if version != VERSION:
        raise CompressError(f"{path}: packed format version {version}; this compress reads version {VERSION}")
    if 10 + hlen > len(blob):
        raise CompressError(f"{path}: truncated packed file (header of {hlen} bytes, file of {len(blob)})")
    try:
        text = _zlib_d(bytes(blob[10:10 + hlen]), MAX_HEADER)
        if len(text) > MAX_HEADER:
            raise CompressError(f"{path}: packed file header over {MAX_HEADER >> 20} MiB")
        header = json.loads(text.decode())
    except (UnicodeDecodeError, ValueError, zlib.error):
        raise CompressError(f"{path}: corrupt packed file (header is not valid deflated JSON)") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT or not isinstance(header.get("tensors"), list):
        raise CompressError(f"{path}: corrupt packed file (header lacks its format or tensors)")
    payload = blob[10 + hlen:]
    if header.get("payload_length") != len(payload):
        raise CompressError(f"{path}: truncated or padded packed file (payload of {len(payload)} bytes, "
                            f"header says {header.get('payload_length')})")
    if "onnx" in header:
        try:
            model = _onnx_back(header, payload, path)
        except CompressError:
            raise
        except Exception as exc:  # onnx/numpy errors on crafted input: still one line
            raise CompressError(f"{path}: corrupt packed file ({type(exc).__name__} rebuilding its ONNX model)") from None
        return {"format": ONNX_FORMAT, "onnx": model, "io": header.get("io"), "meta": header.get("meta") or {}}
    sd = {}
    for i, e in enumerate(header["tensors"]):
        name = e.get("name") if isinstance(e, dict) else None
        if not isinstance(name, str):
            raise CompressError(f"{path}: corrupt packed file (tensor {i} has no name)")
        try:
            sd[name] = decode_tensor(e, payload, f"{path}: tensor {name!r}")
        except CompressError:
            raise
        except Exception as exc:  # numpy/decoder errors on crafted input: still one line
            raise CompressError(f"{path}: corrupt packed file at tensor {name!r} ({type(exc).__name__})") from None
    return {"format": CKPT_FORMAT, "spec": header.get("spec"), "io": header.get("io"),
            "transforms": header.get("transforms") or [], "state_dict": sd, "meta": header.get("meta") or {}}
