"""The machine a report was measured on (also printed by every benchmark script)."""
from __future__ import annotations

import os
import platform

import torch

from compress.runtime.cpu import cpu_features, cpu_model


def machine_info() -> dict:
    import onnxruntime

    feats = cpu_features()
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "int8_flags": feats["int8_flags"], "vnni": feats["vnni"],
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
