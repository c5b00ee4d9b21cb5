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
from compress.api import Result
from compress.checkpoint import load_model, save_model
from compress.data import DataBundle, create_data
from compress.errors import CompressError, RecipeError
from compress.measure.config import BenchmarkConfig
from compress.measure.row import benchmark
from compress.models import create_model
from compress.pipeline import Pipeline
from compress.search import SearchConfig, SearchResult, search  # Optuna itself is imported only when a search runs
from compress.stages.bake import BakeConfig, bake
from compress.stages.cluster import ClusterConfig, cluster
from compress.stages.encode import EncodeConfig, encode
from compress.stages.distill import DistillConfig, distill
from compress.stages.export import ExportConfig, export
from compress.stages.prune import PruneConfig, prune
from compress.stages.quantize import QuantizeConfig, quantize
from compress.trainer import Hook, TrainConfig, Trainer, evaluate, train

__version__ = "0.1.0"

__all__ = [
    "BakeConfig", "BenchmarkConfig", "ClusterConfig", "CompressError", "DataBundle", "DistillConfig", "EncodeConfig",
    "ExportConfig", "Hook", "Pipeline", "PruneConfig", "QuantizeConfig", "RecipeError", "Result", "SearchConfig",
    "SearchResult", "TrainConfig", "Trainer", "bake", "cluster", "encode",
    "benchmark", "create_data", "create_model", "distill", "evaluate", "export", "load_model", "prune",
    "quantize", "save_model", "search", "train",
]
