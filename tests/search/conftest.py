import copy

import pytest


@pytest.fixture
def search_doc() -> dict:
    """A recipe with a search section that trains in about a second per trial (digits, tiny MLPs)."""
    return copy.deepcopy({
        "name": "tiny_search",
        "seed": 0,
        "data": {"name": "digits", "batch_size": 64},
        "teacher": {"name": "mlp", "hidden": [32]},
        "model": {"name": "mlp", "hidden": [16]},
        "benchmark": {"latency": False},
        "stages": [
            {"train": {"target": "teacher", "epochs": 3, "progress": False}},
            {"distill": {"teacher": "recipe", "epochs": 3, "student": {"name": "mlp", "hidden": [16]}, "progress": False}},
            {"prune": {"method": "channel", "sparsity": 0.3, "finetune": {"epochs": 1, "progress": False}}},
        ],
        "search": {
            "objectives": {"accuracy": "max", "size": "min"},  # deterministic: no timing in unit tests
            "constraints": {"max_drop": 0.5},
            "trials": 4,
            "space": {"stages.1.distill.student.hidden": [[8], [16]],
                      "stages.2.prune.sparsity": {"low": 0.1, "high": 0.6}},
        },
    })
