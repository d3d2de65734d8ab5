"""The language-model head with its loss: logits, then cross-entropy (cross_entropy.py).

Forward:   z = x Wᵀ                                   x: (B, T, D)   W: (V, D)   z: (B, T, V)
           loss = CrossEntropy(z, y)                  y: (B, T) ints in [0, V) or −100 (ignored)
Backward:  dz = CrossEntropy_backward(dloss)          (p − onehot(y)) / N_valid on valid positions
           dx = dz W,   dW = Σ dzᵀ x
One (B·T, V) buffer serves as the logits, then the probabilities that backward needs.
"""
from typing import NamedTuple

from . import cross_entropy, linear

IGNORE_INDEX = cross_entropy.IGNORE_INDEX


class Cache(NamedTuple):
    head: linear.Cache
    loss: cross_entropy.Cache


def forward(x, weight, targets):
    """targets: (B, T) ints in [0, V) or IGNORE_INDEX. Returns (loss: a 0-d array, cache)."""
    logits, head = linear.forward(x, weight)
    loss, loss_cache = cross_entropy.forward(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    return loss, Cache(head, loss_cache)


def backward(dloss, cache):
    """Returns dx: (B, T, D) and the weight's gradient (dW, or what a weight object returns: linear.py)."""
    dlogits = cross_entropy.backward(dloss, cache.loss)
    return linear.backward(dlogits.reshape(*cache.head.x.shape[:-1], -1), cache.head)
