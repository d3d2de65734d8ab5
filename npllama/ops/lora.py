"""The LoRA delta (Hu et al., 2021): a trainable low-rank term added to a frozen product.

For x: (..., in), A: (r, in), B: (out, r) and s = alpha / r:
Forward:   u = x Aᵀ                                       u: (..., r)
           δ = s · u Bᵀ                                   δ: (..., out), added to x Wᵀ (adapters.py)
Backward:  dB = s · Σ_rows dδᵀ u                          dB: (out, r)
           du = s · dδ B                                  du: (..., r)
           dA = Σ_rows duᵀ x                              dA: (r, in)
           dx = du A                                      the delta's share of dx
"""
from typing import NamedTuple

from .linear import rows as _rows


class Cache(NamedTuple):
    x: object
    u: object
    a: object
    b: object
    scale: float


def forward(x, a, b, scale):
    """δ = s · (x Aᵀ) Bᵀ: (..., out), and its cache."""
    u = _rows(x) @ a.T
    delta = (u @ b.T) * scale
    return delta.reshape(*x.shape[:-1], b.shape[0]), Cache(x, u, a, b, scale)


def backward(d_delta, cache):
    """Returns dx (the delta's share of it), dA, dB."""
    x, u, a, b, scale = cache
    rows = _rows(d_delta)
    db = (rows.T @ u) * scale
    du = (rows @ b) * scale
    da = du.T @ _rows(x)
    return (du @ a).reshape(x.shape), da, db
