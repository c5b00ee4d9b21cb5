"""Datasets by name (``create_data``) and the DataBundle every stage consumes."""
from compress.data.bundle import DataBundle, DataSpec, DATASETS, create_data, register_dataset, split_indices
from compress.data import builtin as _builtin  # noqa: F401  (registers the built-in datasets)
from compress.data import movielens as _movielens  # noqa: F401  (registers movielens)
from compress.data import imagefolder as _imagefolder  # noqa: F401  (registers imagefolder: Imagenette/Imagewoof layout)
from compress.data import text as _text  # noqa: F401  (registers text: csv/jsonl for transformer classifiers)
from compress.data import lm as _lm  # noqa: F401  (registers lm: token blocks for causal language models)

__all__ = ["DataBundle", "DataSpec", "DATASETS", "create_data", "register_dataset", "split_indices"]
