"""Every op's backward against central finite differences, in float64 (relative error < 1e-6)."""
import numpy as np
import pytest

from npllama import adapters, model
from npllama.config import LlamaConfig
from npllama.ops import attention, cross_entropy, embedding, linear, lm_head, rmsnorm, rope, swiglu
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


GQA_CASES = pytest.mark.parametrize("n_heads, n_kv_heads", [(4, 4), (4, 2), (8, 2), (4, 1)],
                                    ids=["MHA", "GQA-2:1", "GQA-4:1", "MQA"])


@GQA_CASES
def test_attention_core(xp, rng, n_heads, n_kv_heads):
    head_dim, time = 4, 5
    check_op(attention.forward, attention.backward,
             {"q": randn(xp, rng, 2, n_heads, time, head_dim), "k": randn(xp, rng, 2, n_kv_heads, time, head_dim),
              "v": randn(xp, rng, 2, n_kv_heads, time, head_dim)}, xp, rng)


@GQA_CASES
def test_attention_block(xp, rng, n_heads, n_kv_heads):
    """The block's attention (model.py): fused projections, RoPE, the core and the output projection."""
    head_dim, time = 4, 5
    dim, kv_dim = n_heads * head_dim, n_kv_heads * head_dim
    rotation = rope_rotation(xp, head_dim, time)
    inputs = {"x": randn(xp, rng, 2, time, dim), "wq": randn(xp, rng, dim, dim) * 0.5,
              "wk": randn(xp, rng, kv_dim, dim) * 0.5, "wv": randn(xp, rng, kv_dim, dim),
              "wo": randn(xp, rng, dim, dim)}

    def forward(x, wq, wk, wv, wo):
        return model.attention_forward(x, model.fused_qkv(wq, wk, wv, head_dim), wo, rotation, n_heads)

    def backward(dy, cache):
        dx, (dwq, dwk, dwv), dwo = model.attention_backward(dy, cache)
        return dx, dwq, dwk, dwv, dwo
    check_op(forward, backward, inputs, xp, rng)


@pytest.mark.parametrize("frozen", [False, True], ids=["stacked arrays", "a part of its own"])
def test_fused_weight(xp, rng, frozen):
    """Parts with rows reordered and scaled: stacked into one matrix, or (when a part is a weight object)
    each multiplying for itself; every part's gradient comes back in its own layout."""
    orders = [rng.permutation(6), None, rng.permutation(3)]
    inputs = {"x": randn(xp, rng, 2, 3, 5), "w1": randn(xp, rng, 6, 5), "w2": randn(xp, rng, 4, 5),
              "w3": randn(xp, rng, 3, 5)}

    def forward(x, w1, w2, w3):
        parts = [w1, adapters.Frozen(w2) if frozen else w2, w3]
        return linear.forward(x, linear.Fused(list(zip(parts, orders, (0.5, 1.0, 2.0)))))

    def backward(dy, cache):
        dx, (dw1, dw2, dw3) = linear.backward(dy, cache)
        assert (dw2 is None) == frozen
        return (dx, dw1, dw3) if frozen else (dx, dw1, dw2, dw3)
    if frozen:
        w2 = inputs.pop("w2")
        check_op(lambda x, w1, w3: forward(x, w1, w2, w3), backward, inputs, xp, rng)
    else:
        check_op(forward, backward, inputs, xp, rng)


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


def test_cross_entropy(xp, rng):
    targets = xp.asarray([2, cross_entropy.IGNORE_INDEX, 0, 4])
    logits = randn(xp, rng, 4, 5)
    loss, cache = cross_entropy.forward(logits.copy(), targets)
    numeric = numerical_grad(lambda: cross_entropy.forward(logits.copy(), targets)[0], logits)
    assert relative_error(cross_entropy.backward(1.0, cache), numeric) < TOLERANCE
    log_p = cross_entropy.log_softmax(logits)
    assert abs(float(loss) + float(log_p[0, 2] + log_p[2, 0] + log_p[3, 4]) / 3) < 1e-12
    assert float(xp.abs(xp.exp(log_p) - cross_entropy.softmax(logits.copy())).max()) < 1e-15
