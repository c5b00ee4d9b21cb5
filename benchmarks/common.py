"""Shared by every benchmark script: where the data is, what machine ran it, how tables print."""
from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def data_dir() -> Path:
    """COMPRESS_DATA_DIR, else ../shared/data beside the project; exported so recipes can use it."""
    env = os.environ.get("COMPRESS_DATA_DIR")
    d = Path(env) if env else ROOT.parent / "shared" / "data"
    if not d.is_dir():
        sys.exit(f"error: data folder {d} not found; set COMPRESS_DATA_DIR to the folder holding mnist-t10k/ and ml-100k/")
    os.environ["COMPRESS_DATA_DIR"] = str(d.resolve())
    return d.resolve()


def machine_info() -> dict:
    """compress's report machine (compress.measure.machine) plus what the benchmark scripts also print."""
    import numpy
    import torch

    from compress.measure.machine import machine_info as report_machine

    info = {**report_machine(), "torch_threads": torch.get_num_threads(), "numpy": numpy.__version__}
    try:
        import torch_pruning

        info["torch_pruning"] = getattr(torch_pruning, "__version__", "?")
    except ImportError:
        pass
    return info


def machine_line() -> str:
    i = machine_info()
    gpu = f", GPU {i['gpu']}" if i["gpu"] else ""
    feats = ", ".join(i.get("int8_flags") or []) or "none"
    return (f"machine: {i['cpu']}, {i['cores']} cores ({i['torch_threads']} torch threads){gpu}; "
            f"int8 features: {feats} ({'VNNI' if i.get('vnni') else 'no VNNI'}); "
            f"python {i['python']}, torch {i['torch']}, onnxruntime {i['onnxruntime']}")


def markdown_table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)
