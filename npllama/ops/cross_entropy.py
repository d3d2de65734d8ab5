"""Softmax, log-softmax and the cross-entropy loss: the one place each is written.

Over the last axis, with m = max_j z_j subtracted first (the same values, and e^z cannot overflow):
    softmax(z)_i     = e^{z_i − m} / Σ_j e^{z_j − m}
    log_softmax(z)_i = z_i − m − log Σ_j e^{z_j − m}
Cross-entropy of logits z: (N, C) against targets y: (N,) ints in [0, C), or IGNORE_INDEX (−100, as in
torch and HF: such a row adds nothing, and N_valid counts the other rows):
Forward:   p = softmax(z)
           loss = (1/N_valid) Σ_{valid n} −log p[n, y_n] = (1/N_valid) Σ_{valid n} (log Σ_j e^{z_nj − m_n} − (z_{n,y_n} − m_n))
Backward:  dz[n] = dloss · (p[n] − onehot(y_n)) / N_valid on valid rows, 0 on the others
Softmax and the loss are fused: the backward is a subtraction, with no (C × C) Jacobian and no log of
a rounded-off probability.
"""
from typing import NamedTuple

from .. import backend

IGNORE_INDEX = -100


def softmax(z):
    """softmax over the last axis, computed in place (z is overwritten and returned)."""
    xp = backend.array_module(z)
    z -= z.max(axis=-1, keepdims=True)
    xp.exp(z, out=z)
    z /= z.sum(axis=-1, keepdims=True)
    return z


def log_softmax(z):
    """log softmax over the last axis (a new array)."""
    xp = backend.array_module(z)
    shifted = z - z.max(axis=-1, keepdims=True)
    return shifted - xp.log(xp.exp(shifted).sum(axis=-1, keepdims=True))


class Cache(NamedTuple):
    probs: object     # (N, C)
    targets: object   # (N,)
    valid: object     # (N,) bool
    n_valid: int


def forward(logits, targets):
    """logits: (N, C), overwritten (its buffer becomes p); targets: (N,). Returns (loss: a 0-d array, cache)."""
    xp = backend.array_module(logits)
    valid = targets != IGNORE_INDEX
    n_valid = int(valid.sum())
    if n_valid == 0:
        raise ValueError("every target is the ignore index (-100): the loss is undefined")
    logits -= logits.max(axis=-1, keepdims=True)                       # each row's largest logit is 0
    target_logits = logits[xp.arange(targets.shape[0]), xp.where(valid, targets, 0)]
    probs = xp.exp(logits, out=logits)
    sum_exp = probs.sum(axis=-1)
    loss = ((xp.log(sum_exp) - target_logits) * valid).sum() / n_valid
    probs /= sum_exp[:, None]
    return loss, Cache(probs, targets, valid, n_valid)


def backward(dloss, cache):
    """Returns dz: (N, C)."""
    probs, targets, valid, n_valid = cache
    xp = backend.array_module(probs)
    scale = float(dloss) / n_valid  # a Python float keeps the dtype of probs
    dlogits = probs * scale
    dlogits[~valid] = 0
    rows = xp.flatnonzero(valid)
    dlogits[rows, targets[rows]] -= scale
    return dlogits
