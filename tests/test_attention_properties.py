"""What attention must do beyond its derivative: causality, GQA head sharing, RoPE's relative positions."""
import numpy as np

from npllama import attention, rope
from npllama.config import LlamaConfig


def tables(xp, head_dim, time):
    config = LlamaConfig(vocab_size=8, hidden_size=head_dim, intermediate_size=8, num_hidden_layers=1,
                         num_attention_heads=1)
    return rope.tables(config, np.arange(time), np.float64, xp)


def random_attention_weights(xp, rng, n_heads, n_kv_heads, head_dim):
    dim, kv_dim = n_heads * head_dim, n_kv_heads * head_dim
    shapes = [(dim, dim), (kv_dim, dim), (kv_dim, dim), (dim, dim)]
    return [xp.asarray(rng.standard_normal(shape)) for shape in shapes]


def test_causal(xp, rng):
    """Changing token t changes no output before t."""
    cos, sin = tables(xp, 4, 6)
    weights = random_attention_weights(xp, rng, 2, 1, 4)
    x = xp.asarray(rng.standard_normal((1, 6, 8)))
    y, _ = attention.forward(x, *weights, cos, sin)
    x[0, 4] += 1.0
    y_changed, _ = attention.forward(x, *weights, cos, sin)
    assert xp.allclose(y[0, :4], y_changed[0, :4], rtol=0, atol=1e-12)
    assert not xp.allclose(y[0, 4:], y_changed[0, 4:])


def test_gqa_equals_mha_with_repeated_kv_heads(xp, rng):
    """Query head h reads key/value head h // G: the same as MHA with each kv head's rows repeated G times."""
    n_heads, n_kv_heads, head_dim = 6, 2, 4
    group = n_heads // n_kv_heads
    cos, sin = tables(xp, head_dim, 5)
    wq, wk, wv, wo = random_attention_weights(xp, rng, n_heads, n_kv_heads, head_dim)
    x = xp.asarray(rng.standard_normal((2, 5, n_heads * head_dim)))

    def repeat_heads(w):
        return xp.repeat(w.reshape(n_kv_heads, head_dim, -1), group, axis=0).reshape(n_heads * head_dim, -1)

    y_gqa, _ = attention.forward(x, wq, wk, wv, wo, cos, sin)
    y_mha, _ = attention.forward(x, wq, repeat_heads(wk), repeat_heads(wv), wo, cos, sin)
    assert xp.allclose(y_gqa, y_mha, rtol=1e-12, atol=1e-12)


def test_rope_scores_depend_on_relative_position_only(xp, rng):
    """⟨RoPE(q, m), RoPE(k, n)⟩ depends on m − n alone, and RoPE keeps vector norms."""
    head_dim = 8
    cos, sin = tables(xp, head_dim, 10)
    q = xp.asarray(rng.standard_normal(head_dim))
    k = xp.asarray(rng.standard_normal(head_dim))
    q_rot, _ = rope.forward(xp.broadcast_to(q, (10, head_dim)), cos, sin)
    k_rot, _ = rope.forward(xp.broadcast_to(k, (10, head_dim)), cos, sin)
    assert xp.allclose((q_rot[3] * k_rot[1]).sum(), (q_rot[9] * k_rot[7]).sum(), atol=1e-12)
    assert xp.allclose(xp.linalg.norm(q_rot, axis=-1), xp.linalg.norm(q), atol=1e-12)
