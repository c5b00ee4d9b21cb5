"""compress: model compression for PyTorch from one YAML recipe, or one function call per stage.

    from compress import create_model, create_data, train
    data = create_data("digits")
    model = create_model("mlp", data.input_shape, data.num_outputs, hidden=[64])
    model, metrics = train(model, TrainConfig(epochs=5), data)
"""
from compress.api import Result
from compress.checkpoint import load_model, save_model
from compress.data import DataBundle, create_data
from compress.errors import CompressError, RecipeError
from compress.models import create_model
from compress.pipeline import Pipeline
from compress.trainer import Hook, TrainConfig, Trainer, evaluate, train
from compress.stages.distill import DistillConfig, distill  # noqa: F401
from compress.stages.prune import PruneConfig, prune  # noqa: F401
from compress.stages.export import ExportConfig, export  # noqa: F401
from compress.measure import BenchmarkConfig, benchmark  # noqa: F401
from compress.stages.quantize import QuantizeConfig, quantize  # noqa: F401
from compress.stages.bake import BakeConfig, bake  # noqa: F401

__version__ = "0.1.0"

__all__ = [
    "CompressError", "DataBundle", "Hook", "Pipeline", "RecipeError", "Result", "TrainConfig", "Trainer",
    "create_data", "create_model", "evaluate", "load_model", "save_model", "train",
]
