"""Pruning building blocks: schedules, unstructured masks, structured (channel) pruning, regularizers,
sensitivity analysis. The ``prune`` stage (compress/stages/prune.py) composes them."""


def __getattr__(name: str):
    # Lazily: the Pruner reads the stage's config resolution, whose module imports this package.
    if name == "Pruner":
        from compress.pruning.pruner import Pruner

        return Pruner
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
