"""compress: model compression for PyTorch from one YAML recipe, or one function call per stage.

    import compress
    data = compress.create_data("digits")
    teacher = compress.create_model("mlp", data.input_shape, data.num_outputs, hidden=[512, 512])
    teacher, metrics = compress.train(teacher, compress.TrainConfig(epochs=20), data)
    student = compress.create_model("mlp", data.input_shape, data.num_outputs, hidden=[32])
    student, metrics = compress.distill(student, teacher, compress.DistillConfig(temperature=4), data)
    student, metrics = compress.prune(student, compress.PruneConfig(sparsity=0.7, steps=3), data)
    int8, metrics = compress.quantize(student, compress.QuantizeConfig(method="ptq_static"), data)
"""
import sys
import types
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what type checkers and the API docs (griffe reads this statically) see
    from compress.api import Result
    from compress.checkpoint import load_model, save_model
    from compress.data import DataBundle, create_data
    from compress.errors import CompressError, RecipeError
    from compress.measure.config import BenchmarkConfig
    from compress.measure.row import benchmark
    from compress.models import create_model
    from compress.pipeline import Pipeline
    from compress.search import SearchConfig, SearchResult
    from compress.stages.bake import BakeConfig, bake
    from compress.stages.cluster import ClusterConfig, cluster
    from compress.stages.encode import EncodeConfig, encode
    from compress.stages.distill import DistillConfig, distill
    from compress.stages.export import ExportConfig, export
    from compress.pruning.decoder import prune_lm
    from compress.stages.prune import PruneConfig, prune
    from compress.stages.quantize import QuantizeConfig, quantize
    from compress.trainer import Hook, TrainConfig, Trainer, evaluate, train
    from compress.search.engine import search


# The public names are imported on first use (PEP 562): ``compress --help`` and ``import compress.errors``
# must not pay for torch, torch-pruning and every stage (seconds) before they answer.
_LAZY = {
    "Result": "compress.api",
    "load_model": "compress.checkpoint",
    "save_model": "compress.checkpoint",
    "DataBundle": "compress.data",
    "create_data": "compress.data",
    "CompressError": "compress.errors",
    "RecipeError": "compress.errors",
    "BenchmarkConfig": "compress.measure.config",
    "benchmark": "compress.measure.row",
    "create_model": "compress.models",
    "Pipeline": "compress.pipeline",
    "SearchConfig": "compress.search",
    "SearchResult": "compress.search",
    "BakeConfig": "compress.stages.bake",
    "bake": "compress.stages.bake",
    "ClusterConfig": "compress.stages.cluster",
    "cluster": "compress.stages.cluster",
    "EncodeConfig": "compress.stages.encode",
    "encode": "compress.stages.encode",
    "DistillConfig": "compress.stages.distill",
    "distill": "compress.stages.distill",
    "ExportConfig": "compress.stages.export",
    "export": "compress.stages.export",
    "PruneConfig": "compress.stages.prune",
    "prune": "compress.stages.prune",
    "prune_lm": "compress.pruning.decoder",
    "QuantizeConfig": "compress.stages.quantize",
    "quantize": "compress.stages.quantize",
    "Hook": "compress.trainer",
    "TrainConfig": "compress.trainer",
    "Trainer": "compress.trainer",
    "evaluate": "compress.trainer",
    "train": "compress.trainer",
}


def _load_all() -> None:
    """What ``import compress`` did before it was lazy: every stage, model, method and transform registered."""
    import importlib

    for module in sorted({*_LAZY.values(), "compress.stages", "compress.search.engine"}):
        importlib.import_module(module)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        _load_all()
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # once: later lookups do not come back here
        return value
    raise AttributeError(f"module 'compress' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_LAZY, "search"])


class _Compress(types.ModuleType):
    """``compress.search`` is the function, as the eager imports made it, though the subpackage of that
    name binds itself here when it is first imported."""

    @property
    def search(self):
        from compress.search.engine import search

        return search

    @search.setter
    def search(self, module) -> None:
        pass  # the import system's binding of the subpackage: the public name stays the function


sys.modules[__name__].__class__ = _Compress


__version__ = "0.1.0"

__all__ = [
    "BakeConfig", "BenchmarkConfig", "ClusterConfig", "CompressError", "DataBundle", "DistillConfig", "EncodeConfig",
    "ExportConfig", "Hook", "Pipeline", "PruneConfig", "QuantizeConfig", "RecipeError", "Result", "SearchConfig",
    "SearchResult", "TrainConfig", "Trainer", "bake", "cluster", "encode",
    "benchmark", "create_data", "create_model", "distill", "evaluate", "export", "load_model", "prune",
    "quantize", "save_model", "search", "train",
]
