import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("COMPRESS_DATA_DIR") or ROOT.parent / "shared" / "data")

torch.set_num_threads(1)  # many small tests: threads cost more than they give on 2 cores
# No test reaches the Hugging Face hub: set before any module imports huggingface_hub (it reads these once).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"


@pytest.fixture
def shared_data() -> Path:
    """The reference data folder (MNIST t10k, MovieLens 100K), or a skip when this clone has none."""
    if not SHARED.is_dir():
        pytest.skip(f"reference data not found at {SHARED}; set COMPRESS_DATA_DIR")
    os.environ["COMPRESS_DATA_DIR"] = str(SHARED.resolve())
    return SHARED.resolve()


@pytest.fixture
def tiny_recipe() -> dict:
    """A recipe that trains in well under a second."""
    return {
        "name": "tiny",
        "seed": 0,
        "data": {"name": "synthetic", "num_samples": 256, "num_classes": 3, "shape": [1, 6, 6], "batch_size": 32},
        "model": {"name": "mlp", "hidden": [16]},
        "stages": [{"train": {"epochs": 2, "progress": False}}, {"evaluate": {}}],
        "benchmark": {"latency": False},  # timing is for benchmarks/, not unit tests
    }
