"""Every op's backward against central finite differences, in float64 (relative error < 1e-6)."""
import numpy as np
import pytest

from npllama import attention, embedding, linear, lm_head, rmsnorm, rope, swiglu
from npllama.config import LlamaConfig
from tests.gradcheck import numerical_grad, relative_error

TOLERANCE = 1e-6


def randn(xp, rng, *shape):
    return xp.asarray(rng.standard_normal(shape))


def check_op(forward, backward, inputs, xp, rng):
    """Check backward of L = Σ y ⊙ R for a fixed random R, against every input named in `inputs`.

    forward(**inputs) -> (y, cache); backward(R, cache) -> grads in the order of `inputs`."""
    y, cache = forward(**inputs)
    weights = randn(xp, rng, *y.shape)
    analytic = backward(weights, cache)
    analytic = analytic if isinstance(analytic, tuple) else (analytic,)
    assert len(analytic) == len(inputs)
    for (name, x), grad in zip(inputs.items(), analytic):
        assert grad.shape == x.shape, name
        numeric = numerical_grad(lambda: (forward(**inputs)[0] * weights).sum(), x)
        error = relative_error(grad, numeric)
        assert error < TOLERANCE, f"d{name}: relative error {error:.2e}"


def rope_rotation(xp, head_dim, time, theta=10000.0, scaling=None):
    config = LlamaConfig(vocab_size=8, hidden_size=head_dim, intermediate_size=8, num_hidden_layers=1,
                         num_attention_heads=1, rope_theta=theta, rope_scaling=scaling)
    return rope.tables(config, np.arange(time), np.float64, xp)


def test_linear(xp, rng):
    check_op(lambda x, w: linear.forward(x, w), linear.backward,
             {"x": randn(xp, rng, 3, 5, 7), "w": randn(xp, rng, 4, 7)}, xp, rng)


def test_embedding(xp, rng):
    ids = xp.asarray(rng.integers(0, 6, (3, 5)))  # vocab 11 > 6: repeated ids and unused rows
    check_op(lambda w: embedding.forward(w, ids), embedding.backward, {"w": randn(xp, rng, 11, 4)}, xp, rng)


def test_rmsnorm(xp, rng):
    check_op(lambda x, w: rmsnorm.forward(x, w, 1e-5), rmsnorm.backward,
             {"x": randn(xp, rng, 3, 5, 8), "w": randn(xp, rng, 8)}, xp, rng)


@pytest.mark.parametrize("scaling", [None, {"rope_type": "linear", "factor": 4.0}])
def test_rope(xp, rng, scaling):
    rotation = rope_rotation(xp, 8, 6, scaling=scaling)
    check_op(lambda x: rope.forward(x, rotation[:, None]), rope.backward,
             {"x": randn(xp, rng, 2, 6, 3, 8)}, xp, rng)


@pytest.mark.parametrize("n_heads, n_kv_heads", [(4, 4), (4, 2), (8, 2), (4, 1)],
                         ids=["MHA", "GQA-2:1", "GQA-4:1", "MQA"])
def test_attention(xp, rng, n_heads, n_kv_heads):
    head_dim, time = 4, 5
    dim, kv_dim = n_heads * head_dim, n_kv_heads * head_dim
    rotation = rope_rotation(xp, head_dim, time)
    inputs = {"x": randn(xp, rng, 2, time, dim), "wq": randn(xp, rng, dim, dim) * 0.5,
              "wk": randn(xp, rng, kv_dim, dim) * 0.5, "wv": randn(xp, rng, kv_dim, dim),
              "wo": randn(xp, rng, dim, dim)}
    check_op(lambda x, wq, wk, wv, wo: attention.forward(x, wq, wk, wv, wo, rotation),
             attention.backward, inputs, xp, rng)


def test_swiglu(xp, rng):
    check_op(swiglu.forward, swiglu.backward,
             {"x": randn(xp, rng, 2, 5, 6), "w_gate": randn(xp, rng, 9, 6), "w_up": randn(xp, rng, 9, 6),
              "w_down": randn(xp, rng, 6, 9)}, xp, rng)


def test_lm_head_cross_entropy(xp, rng):
    targets = xp.asarray(rng.integers(0, 7, (3, 4)))
    targets[0, :2] = lm_head.IGNORE_INDEX
    inputs = {"x": randn(xp, rng, 3, 4, 6), "w": randn(xp, rng, 7, 6)}
    loss, cache = lm_head.forward(inputs["x"], inputs["w"], targets)
    analytic = lm_head.backward(1.0, cache)
    for (name, x), grad in zip(inputs.items(), analytic):
        numeric = numerical_grad(lambda: lm_head.forward(inputs["x"], inputs["w"], targets)[0], x)
        assert relative_error(grad, numeric) < TOLERANCE, name
