"""``compress search``: a joint search over a recipe's KD, pruning and quantization values (Optuna, optional).

    result = compress.search("recipes/mnist_search.yaml", out="runs/s")
Optuna is imported only when a search runs (``pip install compress[search]``).
"""
from compress.search.config import SearchConfig
from compress.search.engine import SearchResult, search

__all__ = ["SearchConfig", "SearchResult", "search"]
