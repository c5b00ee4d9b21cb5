"""The recipe's ``benchmark:`` section."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, Field, field_validator

from compress.config import StrictModel
from compress.runtime.backends import BACKENDS


def _known_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"expected one of {', '.join(repr(n) for n in BACKENDS.names())}, got {name!r}")
    return name


Backend = Annotated[str, AfterValidator(_known_backend)]  # a name in compress.runtime.backends.BACKENDS


class BenchmarkConfig(StrictModel):
    """The recipe's ``benchmark:`` section. Defaults keep a small model's row to a few seconds."""

    split: Literal["test", "val"] = "test"
    latency: bool = True
    backends: list[Backend] = Field(default_factory=lambda: ["pytorch", "onnxruntime"])
    batch_sizes: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [1, 32], min_length=1)
    runs: int = Field(100, ge=5)  # timed samples per model, backend and batch size
    warmup: int = Field(20, ge=0)  # untimed samples per model first (first-round timings ran ~5% slow with 10)
    # cpu: the calling thread's CPU time, immune to other processes on a shared machine (one thread
    # only); wall: perf_counter. auto: cpu when threads is 1, else wall.
    clock: Literal["auto", "wall", "cpu"] = "auto"
    threads: int = Field(1, ge=1)  # intra-op threads for both backends: fixed so runs compare
    min_sample_ms: float = Field(5.0, ge=0)  # a sample repeats a fast call until it lasts this long
    max_seconds: float = Field(15.0, gt=0)  # per backend and batch size: slow models get fewer runs (>= 10)
    gpu: bool = True  # also time the GPU backends (cuda: PyTorch with CUDA events) when a GPU exists
    macs: bool = True
    zipped: bool = True
    opset: int = Field(17, ge=7, le=20)  # for the temporary ONNX of a model that has none
    progress: bool = True

    @field_validator("batch_sizes")
    @classmethod
    def _unique(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError(f"expected distinct batch sizes, got {v}")
        return v
