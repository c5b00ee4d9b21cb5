"""Weight sharing (Deep Compression, Han et al. 2016, section 3): per-layer 1-D k-means codebooks.

Each Conv/Linear weight becomes ``centroids[codes]``; a pruned layer's zeros stay exactly zero and out
of the codebook (code -1). During fine-tuning the weight is a ``torch.nn.utils.parametrize``
parametrization whose only trainable tensor is the codebook: the gather's backward sums the gradients
of every weight of a cluster into its centroid, as the paper prescribes. ``strip`` turns the layers back
into plain ones whose weights take at most ``2**bits`` distinct non-zero values, which is what
``compress.packfile`` stores as a codebook plus ``bits``-wide indices.

k-means: scikit-learn's ``KMeans`` (Lloyd in compiled code, accepts an explicit initial codebook for the
paper's linear and density inits, and k-means++), run once per layer on the non-zero weights; a layer
has at most a few million weights and this runs once, so a GPU implementation would buy nothing.
"""
from __future__ import annotations

import warnings
from typing import Iterable, Literal

import numpy as np
import torch
import torch.nn as nn
from torch.nn.utils import parametrize

Init = Literal["linear", "density", "kmeans++"]
CLUSTERABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def initial_centroids(values: np.ndarray, k: int, init: Init) -> np.ndarray | str:
    """The paper's three inits: ``linear`` spaces k centroids evenly over [min, max]; ``density`` puts them
    at evenly spaced quantiles of the weights (denser where weights are); ``kmeans++`` is sklearn's."""
    if init == "kmeans++":
        return "k-means++"
    if init == "linear":
        c = np.linspace(values.min(), values.max(), k)
    else:
        c = np.quantile(values, (np.arange(k) + 0.5) / k)
    return np.unique(c.astype(np.float64))


def kmeans_1d(values: np.ndarray, bits: int, init: Init = "linear", seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(centroids float32, codes int64) of 1-D ``values``; at most ``2**bits`` centroids, fewer when the
    values have fewer distinct entries."""
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    distinct = np.unique(values)
    k = min(1 << bits, distinct.size)
    if k == distinct.size:  # nothing to share: every distinct value is its own centroid (exact)
        return distinct.astype(np.float32), np.searchsorted(distinct, values)
    from sklearn.cluster import KMeans

    start = initial_centroids(values, k, init)
    if not isinstance(start, str):
        k = start.shape[0]
        start = start.reshape(-1, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning on duplicate points: the codebook is still valid
        km = KMeans(n_clusters=k, init=start, n_init=1, random_state=seed).fit(values.reshape(-1, 1))
    centroids = km.cluster_centers_.reshape(-1)
    order = np.argsort(centroids)
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    return centroids[order].astype(np.float32), rank[km.labels_]


class SharedWeight(nn.Module):
    """Parametrization ``weight = centroids[codes]`` (0 where ``codes == -1``); the original is the codebook."""

    def __init__(self, codes: torch.Tensor):
        super().__init__()
        self.register_buffer("codes", codes.to(torch.int64))

    def forward(self, centroids: torch.Tensor) -> torch.Tensor:
        keep = self.codes >= 0
        w = centroids[self.codes.clamp(min=0)]
        return torch.where(keep, w, torch.zeros((), dtype=w.dtype, device=w.device))

    def right_inverse(self, centroids: torch.Tensor) -> torch.Tensor:
        # parametrize calls this with the tensor handed to register_parametrization: the codebook itself
        return centroids


def clusterable_layers(model: nn.Module, exclude: Iterable[str] = ()) -> dict[str, nn.Module]:
    exclude = list(exclude)
    return {n: m for n, m in model.named_modules()
            if isinstance(m, CLUSTERABLE) and not any(n == e or n.startswith(e + ".") for e in exclude)}


@torch.no_grad()
def cluster_layer(layer: nn.Module, bits: int, init: Init = "linear", seed: int = 0) -> int:
    """Replace ``layer.weight`` by a shared-weight parametrization; returns the codebook size."""
    w = layer.weight.detach()
    flat = w.cpu().reshape(-1).numpy()
    nz = flat != 0
    codes = np.full(flat.shape, -1, dtype=np.int64)
    if nz.any():
        centroids, idx = kmeans_1d(flat[nz], bits, init, seed)
        codes[nz] = idx
    else:
        centroids = np.zeros(1, dtype=np.float32)
    codes_t = torch.from_numpy(codes).view(w.shape).to(w.device)
    cb = torch.from_numpy(centroids).to(w.device, w.dtype)
    # unsafe: the original (codebook) has another shape than the weight; that is the point here.
    parametrize.register_parametrization(layer, "weight", SharedWeight(codes_t), unsafe=True)
    layer.parametrizations.weight.original = nn.Parameter(cb)
    return int(cb.numel())


def cluster_model(model: nn.Module, bits: int | dict[str, int], init: Init = "linear", exclude: Iterable[str] = (),
                  seed: int = 0) -> dict[str, int]:
    """Cluster every Conv/Linear layer (``bits`` per layer name, or one value); returns name -> codebook size."""
    out = {}
    for name, layer in clusterable_layers(model, exclude).items():
        b = bits[name] if isinstance(bits, dict) else bits
        out[name] = cluster_layer(layer, b, init, seed)
    return out


def clustered_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules()
            if parametrize.is_parametrized(m, "weight") and isinstance(m.parametrizations.weight[0], SharedWeight)}


def centroid_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [m.parametrizations.weight.original for m in clustered_layers(model).values()]


def strip(model: nn.Module) -> nn.Module:
    """Back to plain layers holding ``centroids[codes]`` as an ordinary weight (what export and pack take)."""
    for m in clustered_layers(model).values():
        parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
    return model


def distinct_nonzero(t: torch.Tensor) -> int:
    return int(torch.unique(t[t != 0]).numel())
