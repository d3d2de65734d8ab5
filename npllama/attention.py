"""Causal self-attention with grouped-query attention (GQA; MQA when one key/value head is shared).

Shapes: x: (B, T, D); H query heads and K key/value heads of size hd (D = H·hd); G = H / K query
heads share each key/value head; query head h reads key/value head h // G (HF's repeat_kv order).

Forward:
    q = RoPE(x Wqᵀ) · s,  k = RoPE(x Wkᵀ),  v = x Wvᵀ      q: (B, H, T, hd)   k, v: (B, K, T, hd)
                                                           s = 1/√hd folded into q (cheaper than scores)
    S = q kᵀ + M                                           S: (B, H, T, T); M[i, j] = −∞ where j > i
    P = softmax(S) over the last axis                      P: (B, H, T, T)
    O = P v                                                O: (B, H, T, hd), heads concatenated (B, T, D)
    y = O Woᵀ                                              y: (B, T, D)
    GQA costs no copy of k or v: the G query heads of one group are stacked along the time axis,
    q -> (B, K, G·T, hd), so one batched matmul per group serves all of them.
Backward (dy given):
    dO = dy Wo,  dWo = Σ dyᵀ O
    dP = dO vᵀ,  dv = Pᵀ dO                                (dv sums over the G heads of its group)
    dS = P ⊙ (dP − rowsum(dP ⊙ P))                         softmax's Jacobian-vector product
    dq = dS k,   dk = dSᵀ q                                 (with q already scaled by s)
    then RoPE backward on dq·s and dk, and the three input projections:
    dx = dq Wq + dk Wk + dv Wv,   dWq = Σ dqᵀ x  (likewise dWk, dWv)
"""
from . import backend, linear, rope


def causal_mask(t_query, t_key, dtype, xp):
    """M: (t_query, t_key), 0 where query i may see key j, −∞ where j is in its future.

    Queries are the last t_query of the t_key positions (a KV cache puts earlier keys first)."""
    future = xp.arange(t_key)[None, :] > xp.arange(t_key - t_query, t_key)[:, None]
    return xp.where(future, xp.asarray(-xp.inf, dtype=dtype), xp.asarray(0, dtype=dtype))


def softmax(scores):
    """Numerically stable softmax over the last axis."""
    xp = backend.array_module(scores)
    e = xp.exp(scores - scores.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _split_heads(x, head_dim):
    """(B, T, n·hd) -> (B, n, T, hd)."""
    batch, time, width = x.shape
    return x.reshape(batch, time, width // head_dim, head_dim).transpose(0, 2, 1, 3)


def _merge_heads(x):
    """(B, n, T, hd) -> (B, T, n·hd)."""
    batch, heads, time, head_dim = x.shape
    return x.transpose(0, 2, 1, 3).reshape(batch, time, heads * head_dim)


def forward(x, wq, wk, wv, wo, cos, sin):
    """x: (B, T, D); wq, wo: (D, D); wk, wv: (K·hd, D); cos, sin: (T, hd/2). Returns y: (B, T, D)."""
    xp = backend.array_module(x)
    batch, time, _ = x.shape
    head_dim = 2 * cos.shape[-1]
    n_heads, n_kv_heads = wq.shape[0] // head_dim, wk.shape[0] // head_dim
    scale = head_dim ** -0.5

    q, _ = rope.forward(_split_heads(linear.forward(x, wq)[0], head_dim), cos, sin)
    k, _ = rope.forward(_split_heads(linear.forward(x, wk)[0], head_dim), cos, sin)
    v = _split_heads(linear.forward(x, wv)[0], head_dim)
    q = (q * scale).reshape(batch, n_kv_heads, -1, head_dim)             # (B, K, G·T, hd)

    scores = (q @ k.transpose(0, 1, 3, 2)).reshape(batch, n_kv_heads, -1, time, time)
    scores += causal_mask(time, time, scores.dtype, xp)                  # (B, K, G, T, T)
    probs = softmax(scores).reshape(batch, n_kv_heads, -1, time)          # (B, K, G·T, T)
    out = _merge_heads((probs @ v).reshape(batch, n_heads, time, head_dim))
    y = linear.forward(out, wo)[0]
    return y, (x, q, k, v, probs, out, wq, wk, wv, wo, cos, sin)


def backward(dy, cache):
    """Returns dx, dWq, dWk, dWv, dWo."""
    x, q, k, v, probs, out, wq, wk, wv, wo, cos, sin = cache
    batch, n_kv_heads, _, head_dim = q.shape
    scale = head_dim ** -0.5

    d_out, dwo = linear.backward(dy, (out, wo))
    d_out = _split_heads(d_out, head_dim).reshape(q.shape)              # (B, K, G·T, hd)
    d_probs = d_out @ v.transpose(0, 1, 3, 2)
    dv = probs.transpose(0, 1, 3, 2) @ d_out                             # (B, K, T, hd)
    d_scores = probs * (d_probs - (d_probs * probs).sum(axis=-1, keepdims=True))
    dq = (d_scores @ k).reshape(batch, -1, k.shape[2], head_dim) * scale  # (B, H, T, hd)
    dk = d_scores.transpose(0, 1, 3, 2) @ q                              # (B, K, T, hd)

    dx_q, dwq = linear.backward(_merge_heads(rope.backward(dq, (cos, sin))), (x, wq))
    dx_k, dwk = linear.backward(_merge_heads(rope.backward(dk, (cos, sin))), (x, wk))
    dx_v, dwv = linear.backward(_merge_heads(dv), (x, wv))
    return dx_q + dx_k + dx_v, dwq, dwk, dwv, dwo
