"""The CPU a model runs on: its name and the features that decide which int8 kernels ONNX Runtime picks.

Below both ``compress.quant`` (int8 formats that stay right on every CPU) and ``compress.measure``
(the machine a report was measured on), so neither imports the other for it.
"""
from __future__ import annotations

import platform
from functools import lru_cache
from pathlib import Path

# The /proc/cpuinfo flags that decide which int8 kernels ONNX Runtime runs.
INT8_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")


def _cpuinfo_field(name: str) -> str | None:
    """The first ``name : value`` line of /proc/cpuinfo (Linux); None elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(name):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    """'Intel(R) Xeon(R) ...' where /proc/cpuinfo says so, else what ``platform`` knows."""
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


@lru_cache(maxsize=1)
def cpu_features() -> dict:
    """The CPU's int8-relevant features, and whether ORT's U8S8 kernels saturate on it."""
    flags = set((_cpuinfo_field("flags") or "").split())
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
    vnni = bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})
    return {"arch": platform.machine(), "int8_flags": [f for f in INT8_FLAGS if f in flags],
            "vnni": vnni, "u8s8_saturates": x86 and "avx2" in flags and not vnni}
