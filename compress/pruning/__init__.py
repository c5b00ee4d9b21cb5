"""Pruning building blocks: schedules, unstructured masks, structured (channel) pruning, regularizers,
sensitivity analysis. The ``prune`` stage (compress/stages/prune.py) composes them."""
