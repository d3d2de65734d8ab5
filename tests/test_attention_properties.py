"""What attention must do beyond its derivative: causality, GQA head sharing, RoPE's rotation."""
import numpy as np
import pytest

from npllama import backend, model
from npllama.ops import rope
from npllama.config import LlamaConfig


def rotation_table(xp, head_dim, time):
    config = LlamaConfig(vocab_size=8, hidden_size=head_dim, intermediate_size=8, num_hidden_layers=1,
                         num_attention_heads=1)
    return rope.tables(config, np.arange(time), np.float64, xp)


def attend(x, wq, wk, wv, wo, rotation):
    """The block's attention (model.py): fused projections, RoPE, the core, the output projection."""
    head_dim = 2 * rotation.shape[-1]
    return model.attention_forward(x, model.fused_qkv(wq, wk, wv, head_dim), wo, rotation, wq.shape[0] // head_dim)


def random_attention_weights(xp, rng, n_heads, n_kv_heads, head_dim):
    dim, kv_dim = n_heads * head_dim, n_kv_heads * head_dim
    shapes = [(dim, dim), (kv_dim, dim), (kv_dim, dim), (dim, dim)]
    return [xp.asarray(rng.standard_normal(shape)) for shape in shapes]


def test_causal(xp, rng):
    """Changing token t changes no output before t."""
    rotation = rotation_table(xp, 4, 6)
    weights = random_attention_weights(xp, rng, 2, 1, 4)
    x = xp.asarray(rng.standard_normal((1, 6, 8)))
    y, _ = attend(x, *weights, rotation)
    x[0, 4] += 1.0
    y_changed, _ = attend(x, *weights, rotation)
    assert xp.allclose(y[0, :4], y_changed[0, :4], rtol=0, atol=1e-12)
    assert not xp.allclose(y[0, 4:], y_changed[0, 4:])


def test_gqa_equals_mha_with_repeated_kv_heads(xp, rng):
    """Query head h reads key/value head h // G: the same as MHA with each kv head's rows repeated G times."""
    n_heads, n_kv_heads, head_dim = 6, 2, 4
    group = n_heads // n_kv_heads
    rotation = rotation_table(xp, head_dim, 5)
    wq, wk, wv, wo = random_attention_weights(xp, rng, n_heads, n_kv_heads, head_dim)
    x = xp.asarray(rng.standard_normal((2, 5, n_heads * head_dim)))

    def repeat_heads(w):
        return xp.repeat(w.reshape(n_kv_heads, head_dim, -1), group, axis=0).reshape(n_heads * head_dim, -1)

    y_gqa, _ = attend(x, wq, wk, wv, wo, rotation)
    y_mha, _ = attend(x, wq, repeat_heads(wk), repeat_heads(wv), wo, rotation)
    assert xp.allclose(y_gqa, y_mha, rtol=1e-12, atol=1e-12)


def hf_rotate_half(x, position, theta=10000.0):
    """HF's apply_rotary_pos_emb for one head vector, written independently with NumPy."""
    head_dim = x.shape[-1]
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
    angles = np.concatenate([position * inv_freq] * 2)
    rotated_half = np.concatenate((-x[head_dim // 2:], x[:head_dim // 2]))
    return x * np.cos(angles) + rotated_half * np.sin(angles)


def test_paired_rotation_is_hf_rotate_half(xp, rng):
    """to_pairs, then the complex rotation, then back, is HF's rotate-half RoPE."""
    head_dim, n_heads, time = 8, 3, 7
    rotation = rotation_table(xp, head_dim, time)
    x = rng.standard_normal((time, n_heads * head_dim))                 # rows: positions
    paired = rope.to_pairs(xp.asarray(x).T, head_dim).T                   # features in paired order
    rotated, _ = rope.forward(xp.ascontiguousarray(paired).reshape(time, n_heads, head_dim), rotation[:, None])
    back = rope.from_pairs(rotated.reshape(time, -1).T, head_dim).T
    expected = [[hf_rotate_half(x[t, h * head_dim:(h + 1) * head_dim], t) for h in range(n_heads)]
                for t in range(time)]
    np.testing.assert_allclose(backend.to_host(back), np.reshape(expected, (time, -1)), rtol=0, atol=1e-12)


@pytest.mark.parametrize("head_dim", [2, 8, 64])
def test_pair_order_round_trip(xp, head_dim):
    weight = xp.arange(3 * head_dim * 2, dtype=xp.float64).reshape(3 * head_dim, 2)
    assert bool((rope.from_pairs(rope.to_pairs(weight, head_dim), head_dim) == weight).all())


def test_rope_scores_depend_on_relative_position_only(xp, rng):
    """⟨RoPE(q, m), RoPE(k, n)⟩ depends on m − n alone, and RoPE keeps vector norms."""
    head_dim = 8
    rotation = rotation_table(xp, head_dim, 10)
    q = xp.asarray(rng.standard_normal(head_dim))
    k = xp.asarray(rng.standard_normal(head_dim))
    q_rot, _ = rope.forward(xp.ascontiguousarray(xp.broadcast_to(q, (10, head_dim))), rotation)
    k_rot, _ = rope.forward(xp.ascontiguousarray(xp.broadcast_to(k, (10, head_dim))), rotation)
    assert xp.allclose((q_rot[3] * k_rot[1]).sum(), (q_rot[9] * k_rot[7]).sum(), atol=1e-12)
    assert xp.allclose(xp.linalg.norm(q_rot, axis=-1), xp.linalg.norm(q), atol=1e-12)
