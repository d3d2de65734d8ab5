"""Token embedding: a row lookup forward, a scatter-add backward.

Forward:   x[b, t] = W[ids[b, t]]                     ids: (B, T) int   W: (V, D)   x: (B, T, D)
Backward:  dW[v] = Σ_{(b,t): ids[b,t] = v} dx[b, t]   dW: (V, D); rows of unused tokens stay zero.
           The ids are integers: no gradient flows to them, so backward returns dW alone.
"""
from typing import NamedTuple

from .. import backend


class Cache(NamedTuple):
    ids: object
    shape: tuple


def forward(weight, ids):
    """weight: (V, D); ids: (B, T) on the weight's device."""
    return weight[ids], Cache(ids, weight.shape)


def backward(dx, cache):
    """Returns dW: (V, D), in dx's dtype."""
    ids, shape = cache
    xp = backend.array_module(dx)
    dweight = xp.zeros(shape, dtype=dx.dtype)
    backend.scatter_add(dweight, ids.reshape(-1), dx.reshape(-1, shape[1]))
    return dweight
