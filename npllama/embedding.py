"""Token embedding: a row lookup forward, a scatter-add backward.

Forward:   x[b, t] = W[ids[b, t]]                     ids: (B, T) int   W: (V, D)   x: (B, T, D)
Backward:  dW[v] = Σ_{(b,t): ids[b,t] = v} dx[b, t]   dW: (V, D); rows of unused tokens stay zero.
           The ids are integers: no gradient flows to them, so backward returns dW alone.
"""
from . import backend, lora


def forward(weight, ids):
    """weight: (V, D) array, or lora.Frozen (then backward returns None and does no work)."""
    x = lora.base(weight)[ids]
    return x, (ids, weight.shape, lora.base(weight).dtype, isinstance(weight, lora.Frozen))


def backward(dx, cache):
    ids, shape, dtype, frozen = cache
    if frozen:
        return None
    xp = backend.array_module(dx)
    dweight = xp.zeros(shape, dtype=dtype)
    backend.scatter_add(dweight, ids.reshape(-1), dx.reshape(-1, shape[1]))
    return dweight
