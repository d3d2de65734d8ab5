"""Causal attention of projected queries, keys and values, with grouped-query attention (GQA; MQA when
one key/value head is shared by all). As llm.c's attention_forward takes the projected qkv, this is what
happens between a block's projections: the projections and RoPE are the block's (model.py).

Shapes: q: (B, H, T, hd) for T query positions; k, v: (B, K, S, hd) for S ≥ T key positions, the
queries being the last T of them (a KV cache holds the earlier ones). G = H / K query heads share each
key/value head: query head h reads key/value head h // G (HF's repeat_kv order).

Forward (q arrives scaled by 1/√hd: the model folds the scale into Wq):
    A = q kᵀ + M              A: (B, H, T, S); M[i, j] = −∞ where key j lies in query i's future, else 0
    P = softmax(A)            over the last axis (cross_entropy.softmax)
    O = P v                   O: (B, H, T, hd)
Backward (dO given):
    dP = dO vᵀ,   dv = Σ_{the G heads of a group} Pᵀ dO
    dA = P ⊙ (dP − rowsum(dP ⊙ P))         softmax's Jacobian-vector product
    dq = dA k,    dk = Σ_{the G heads of a group} dAᵀ q
GQA costs no copy of k or v: the G query heads of a group are stacked along the time axis,
q -> (B, K, G·T, hd), so one batched product per group serves them all and sums dk, dv over them.
"""
import functools
from typing import NamedTuple

from .. import backend
from .cross_entropy import softmax


@functools.lru_cache(maxsize=16)
def causal_mask(t_query, t_key, dtype, xp):
    """M: (t_query, t_key), 0 where query i may see key j, −∞ where j is in its future (read-only:
    the same array is returned for the same arguments). Queries are the last t_query of the t_key
    positions."""
    future = xp.arange(t_key)[None, :] > xp.arange(t_key - t_query, t_key)[:, None]
    return xp.where(future, xp.asarray(-xp.inf, dtype=dtype), xp.asarray(0, dtype=dtype))


class Cache(NamedTuple):
    grouped_q: object  # (B, K, G·T, hd)
    k: object          # (B, K, S, hd)
    v: object          # (B, K, S, hd)
    probs: object      # P: (B, K, G·T, S)
    q_shape: tuple     # (B, H, T, hd)


def forward(q, k, v):
    """Returns O: (B, H, T, hd) and the cache."""
    xp = backend.array_module(q)
    batch, n_heads, time, head_dim = q.shape
    n_kv_heads, keys = k.shape[1], k.shape[2]
    grouped = q.reshape(batch, n_kv_heads, -1, head_dim)                                # (B, K, G·T, hd)
    scores = (grouped @ k.transpose(0, 1, 3, 2)).reshape(batch, n_kv_heads, -1, time, keys)  # (B, K, G, T, S)
    if time > 1:  # a single query is the newest position: no key lies in its future
        scores += causal_mask(time, keys, scores.dtype, xp)
    probs = softmax(scores).reshape(batch, n_kv_heads, -1, keys)
    out = (probs @ v).reshape(batch, n_heads, time, head_dim)
    return out, Cache(grouped, k, v, probs, q.shape)


def backward(d_out, cache):
    """Returns dq: (B, H, T, hd), dk, dv: (B, K, S, hd)."""
    grouped, k, v, probs, _ = cache
    xp = backend.array_module(d_out)
    d_out = d_out.reshape(grouped.shape)                                 # (B, K, G·T, hd)
    d_probs = d_out @ v.transpose(0, 1, 3, 2)
    dv = probs.transpose(0, 1, 3, 2) @ d_out
    d_scores = d_probs
    d_scores -= xp.einsum("...j,...j->...", d_probs, probs)[..., None]
    d_scores *= probs
    dq = d_scores @ k
    dk = d_scores.transpose(0, 1, 3, 2) @ grouped
    return dq.reshape(cache.q_shape), dk, dv
