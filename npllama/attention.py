"""Causal self-attention with grouped-query attention (GQA; MQA when one key/value head is shared).

Shapes: x: (B, T, D); H query heads and K key/value heads of size hd (D = H·hd); G = H / K query
heads share each key/value head; query head h reads key/value head h // G (HF's repeat_kv order).

Forward (s = 1/√hd):
    q = s · RoPE(x Wqᵀ),  k = RoPE(x Wkᵀ),  v = x Wvᵀ      q: (B, H, T, hd)   k, v: (B, K, T, hd)
    S = q kᵀ + M                                           S: (B, H, T, T); M[i, j] = −∞ where j > i
    P = softmax(S) over the last axis                      P: (B, H, T, T)
    O = P v                                                O: (B, H, T, hd), heads concatenated (B, T, D)
    y = O Woᵀ                                              y: (B, T, D)
Backward (dy given):
    dO = dy Wo,  dWo = Σ dyᵀ O
    dP = dO vᵀ,  dv = Pᵀ dO                                (dv sums over the G heads of its group)
    dS = P ⊙ (dP − rowsum(dP ⊙ P))                         softmax's Jacobian-vector product
    dq = dS k,   dk = dSᵀ q                                 (gradients of the rotated, scaled q and of k)
    dWq = s · Σ RoPE⁻¹(dq)ᵀ x,  dWk = Σ RoPE⁻¹(dk)ᵀ x,  dWv = Σ dvᵀ x
    dx = s · RoPE⁻¹(dq) Wq + RoPE⁻¹(dk) Wk + dv Wv
How it is computed:
  - The three projections are one product with the stacked weight [s·Wq; Wk; Wv] (fused_qkv_weight).
    The q and k rows are in RoPE's paired order (rope.py), which leaves every q·k unchanged.
  - GQA costs no copy of k or v: the G query heads of one group are stacked along the time axis,
    q -> (B, K, G·T, hd), so one batched product per group serves all of them.
"""
import functools

from . import backend, linear, lora, rope, streamed


@functools.lru_cache(maxsize=16)
def causal_mask(t_query, t_key, dtype, xp):
    """M: (t_query, t_key), 0 where query i may see key j, −∞ where j is in its future (read-only:
    the same array is returned for the same arguments).

    Queries are the last t_query of the t_key positions (a KV cache puts earlier keys first)."""
    future = xp.arange(t_key)[None, :] > xp.arange(t_key - t_query, t_key)[:, None]
    return xp.where(future, xp.asarray(-xp.inf, dtype=dtype), xp.asarray(0, dtype=dtype))


def softmax(scores):
    """Numerically stable softmax over the last axis, computed in place (scores is overwritten)."""
    xp = backend.array_module(scores)
    scores -= scores.max(axis=-1, keepdims=True)
    xp.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    return scores


def _split_heads(x, head_dim):
    """(B, T, n·hd) -> (B, n, T, hd)."""
    batch, time, width = x.shape
    return x.reshape(batch, time, width // head_dim, head_dim).transpose(0, 2, 1, 3)


def _merge_heads(x):
    """(B, n, T, hd) -> (B, T, n·hd)."""
    batch, heads, time, head_dim = x.shape
    return x.transpose(0, 2, 1, 3).reshape(batch, time, heads * head_dim)


def to_fused_rows(projection, rows, head_dim):
    """Rows (out, ...) of q_proj, k_proj or v_proj as the fused weight holds them: q and k in RoPE's
    paired order (rope.py), q scaled by s = 1/√hd (RoPE is linear: RoPE(x (s·Wq)ᵀ) = s·RoPE(x Wqᵀ))."""
    if projection == "v_proj":
        return rows
    paired = rope.to_pairs(rows, head_dim)
    return paired * head_dim ** -0.5 if projection == "q_proj" else paired


def from_fused_rows(projection, rows, head_dim):
    """The gradient of rows in the fused layout -> the gradient of the projection's rows (the transpose
    of to_fused_rows: the same reordering undone and the same scale)."""
    if projection == "v_proj":
        return rows
    unpaired = rope.from_pairs(rows, head_dim)
    return unpaired * head_dim ** -0.5 if projection == "q_proj" else unpaired


def fused_qkv_weight(wq, wk, wv, head_dim):
    """[s·Wq; Wk; Wv]: (H·hd + 2·K·hd, D), the three projections as one product (to_fused_rows), at
    the cost of a (D, D) multiply instead of a (B, T, D) one. Frozen projections (lora.py) make a
    frozen fused weight; their adapters are applied beside it (qkv_adapters)."""
    weights = {"q_proj": wq, "k_proj": wk, "v_proj": wv}
    frozen = [isinstance(w, lora.Frozen) for w in weights.values()]
    if any(frozen) and not all(frozen):
        raise ValueError("q_proj, k_proj and v_proj must be all trained or all frozen")
    rows = [to_fused_rows(name, lora.base(w), head_dim) for name, w in weights.items()]
    if isinstance(rows[0], streamed.Streamed):  # generation from weights kept as stored
        fused = streamed.stack(rows)
    else:
        fused = backend.array_module(rows[0]).concatenate(rows)
    return lora.Frozen(fused) if all(frozen) else fused


def qkv_adapters(wq, wk, wv, head_dim):
    """The LoRA adapters of q, k and v in the fused layout: [(name, rows of the fused output, A, B', s)],
    B' = to_fused_rows(B), so that each adds s·(x Aᵀ) B'ᵀ to its rows of the fused product."""
    adapters, start = [], 0
    for name, weight in (("q_proj", wq), ("k_proj", wk), ("v_proj", wv)):
        end = start + weight.shape[0]
        if isinstance(weight, lora.Frozen) and weight.adapted:
            adapters.append((name, slice(start, end), weight.a, to_fused_rows(name, weight.b, head_dim), weight.scale))
        start = end
    return adapters


def _project(x, w_qkv, adapters, rotation, n_heads):
    """x: (B, T, D) -> q: (B, K, G·T, hd), the G query heads of each key/value head stacked along time,
    and k, v: (B, K, T, hd); q and k rotated by RoPE for positions given by rotation: (T, hd/2).
    Also returns the caches of the fused product and of the adapters."""
    xp = backend.array_module(x)
    batch, time, _ = x.shape
    head_dim = 2 * rotation.shape[-1]
    n_kv_heads = (w_qkv.shape[0] // head_dim - n_heads) // 2
    qkv, qkv_cache = linear.forward(x, w_qkv)
    adapter_caches = []
    for _, rows, a, b, scale in adapters:
        delta, cache = lora.delta_forward(x, a, b, scale)
        qkv[..., rows] += delta
        adapter_caches.append(cache)
    qkv = qkv.reshape(batch, time, n_heads + 2 * n_kv_heads, head_dim)
    qk, _ = rope.forward(qkv[:, :, :n_heads + n_kv_heads], rotation[:, None])   # positions on axis 1
    q = qk[:, :, :n_heads].transpose(0, 2, 1, 3).reshape(batch, n_kv_heads, -1, head_dim)
    # k and v are copied out so the cache does not keep the whole fused buffers alive.
    k = xp.ascontiguousarray(qk[:, :, n_heads:].transpose(0, 2, 1, 3))
    v = xp.ascontiguousarray(qkv[:, :, n_heads + n_kv_heads:].transpose(0, 2, 1, 3))
    return q, k, v, (qkv_cache, adapter_caches)


def _attend(q, k, v, time):
    """Causal attention of q: (B, K, G·T, hd), queries at the last T of the S positions of
    k, v: (B, K, S, hd). Returns O: (B, T, H·hd), heads concatenated, and P: (B, K, G·T, S)."""
    xp = backend.array_module(q)
    batch, n_kv_heads, group_rows, head_dim = q.shape
    keys = k.shape[2]
    scores = (q @ k.transpose(0, 1, 3, 2)).reshape(batch, n_kv_heads, -1, time, keys)  # (B, K, G, T, S)
    if time > 1:  # a single query is the newest position: no key lies in its future
        scores += causal_mask(time, keys, scores.dtype, xp)
    probs = softmax(scores).reshape(batch, n_kv_heads, group_rows, keys)
    out = _merge_heads((probs @ v).reshape(batch, -1, time, head_dim))
    return out, probs


def forward(x, wq, wk, wv, wo, rotation):
    """x: (B, T, D); wq, wo: (D, D); wk, wv: (K·hd, D); rotation: (T, hd/2) complex RoPE table.
    Returns y: (B, T, D)."""
    head_dim = 2 * rotation.shape[-1]
    adapters = qkv_adapters(wq, wk, wv, head_dim)
    q, k, v, projection = _project(x, fused_qkv_weight(wq, wk, wv, head_dim), adapters, rotation,
                                   wq.shape[0] // head_dim)
    out, probs = _attend(q, k, v, x.shape[1])
    y, o_cache = linear.forward(out, wo)
    return y, (q, k, v, probs, projection, adapters, o_cache, rotation)


def backward(dy, cache):
    """Returns dx and the gradients of Wq, Wk, Wv, Wo (each None when frozen, a lora.AdapterGrad when
    adapted)."""
    q, k, v, probs, (qkv_cache, adapter_caches), adapters, o_cache, rotation = cache
    xp = backend.array_module(dy)
    batch, n_kv_heads, _, head_dim = q.shape
    time = k.shape[2]
    n_heads = q.shape[2] // time * n_kv_heads

    d_out, dwo = linear.backward(dy, o_cache)
    d_out = _split_heads(d_out, head_dim).reshape(q.shape)              # (B, K, G·T, hd)
    d_probs = d_out @ v.transpose(0, 1, 3, 2)
    dv = probs.transpose(0, 1, 3, 2) @ d_out                             # (B, K, T, hd)
    d_scores = d_probs
    d_scores -= xp.einsum("...j,...j->...", d_probs, probs)[..., None]
    d_scores *= probs
    dq = (d_scores @ k).reshape(batch, n_heads, time, head_dim)           # (B, H, T, hd)
    dk = d_scores.transpose(0, 1, 3, 2) @ q                              # (B, K, T, hd)

    # Gather dq, dk, dv into the layout of the fused projection, undo RoPE, then one product back.
    d_qkv = xp.empty((batch, time, n_heads + 2 * n_kv_heads, head_dim), dtype=dy.dtype)
    d_qkv[:, :, :n_heads] = dq.transpose(0, 2, 1, 3)
    d_qkv[:, :, n_heads:n_heads + n_kv_heads] = dk.transpose(0, 2, 1, 3)
    d_qkv[:, :, :n_heads + n_kv_heads] = rope.backward(d_qkv[:, :, :n_heads + n_kv_heads], rotation[:, None])
    d_qkv[:, :, n_heads + n_kv_heads:] = dv.transpose(0, 2, 1, 3)
    d_qkv = d_qkv.reshape(batch, time, -1)
    dx, dw_qkv = linear.backward(d_qkv, qkv_cache)
    q_rows, k_rows = n_heads * head_dim, n_kv_heads * head_dim
    rows = {"q_proj": slice(0, q_rows), "k_proj": slice(q_rows, q_rows + k_rows),
            "v_proj": slice(q_rows + k_rows, None)}
    grads = {name: None if dw_qkv is None else from_fused_rows(name, dw_qkv[part], head_dim).copy()
             for name, part in rows.items()}
    for (name, part, *_), adapter_cache in zip(adapters, adapter_caches):
        dx_adapter, da, db = lora.delta_backward(d_qkv[..., part], adapter_cache)
        dx += dx_adapter
        grads[name] = lora.AdapterGrad(da, from_fused_rows(name, db, head_dim))
    return dx, grads["q_proj"], grads["k_proj"], grads["v_proj"], dwo


# ---- generation: attention over a KV cache (no backward needed) ---------------------------------
class KVCache:
    """Keys and values of the positions seen so far, for every layer, preallocated for max_len positions.
    keys[l], values[l]: (B, K, max_len, hd); the first `length` positions are filled."""

    def __init__(self, n_layers, batch, n_kv_heads, max_len, head_dim, dtype, xp):
        shape = (n_layers, batch, n_kv_heads, max_len, head_dim)
        self.keys, self.values = xp.zeros(shape, dtype=dtype), xp.zeros(shape, dtype=dtype)
        self.length = 0
        self.max_len = max_len

    def append(self, layer, k, v):
        """Store k, v: (B, K, T, hd) of the next T positions; returns views of all S = length + T."""
        end = self.length + k.shape[2]
        self.keys[layer, :, :, self.length:end] = k
        self.values[layer, :, :, self.length:end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]


def forward_cached(x, w_qkv, adapters, wo, rotation, kv_cache, layer):
    """Inference only: attention of the next T positions x: (B, T, D) to every position so far,
    whose keys and values kv_cache holds (these are added to it). w_qkv: fused_qkv_weight(...),
    adapters: qkv_adapters(...); rotation: (T, hd/2), the RoPE table of these T positions.
    Returns y: (B, T, D). The caller advances kv_cache.length by T once every layer has run."""
    q, k, v, _ = _project(x, w_qkv, adapters, rotation, wo.shape[1] // (2 * rotation.shape[-1]))
    keys, values = kv_cache.append(layer, k, v)
    out, _ = _attend(q, keys, values, x.shape[1])
    return linear.forward(out, wo)[0]
