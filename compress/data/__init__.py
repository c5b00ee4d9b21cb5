"""Datasets by name (``create_data``) and the DataBundle every stage consumes."""
from compress.data.bundle import DataBundle, DataSpec, DATASETS, create_data, register_dataset, split_indices
from compress.data import builtin as _builtin  # noqa: F401  (registers the built-in datasets)

__all__ = ["DataBundle", "DataSpec", "DATASETS", "create_data", "register_dataset", "split_indices"]
