"""The whole model's gradients against central finite differences, in float64.

Every parameter tensor has a few sampled entries checked (relative error < 1e-6 over the samples)."""
import re

import numpy as np
import pytest

import npllama
from npllama import backend
from tests.gradcheck import numerical_grad, relative_error

SAMPLES_PER_TENSOR = 4


def random_params(config, xp, rng):
    """float64 parameters large enough that every gradient is well above finite-difference noise."""
    params = npllama.init_params(config, dtype="float64")
    for name, value in params.items():
        if value.ndim == 1:
            params[name] = xp.asarray(rng.uniform(0.5, 1.5, value.shape))
        else:
            params[name] = xp.asarray(rng.standard_normal(value.shape) * 0.5)
    return params


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_model_gradients(xp, rng, tied):
    config = npllama.LlamaConfig(vocab_size=13, hidden_size=16, intermediate_size=20, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    params = random_params(config, xp, rng)
    tokens = rng.integers(0, config.vocab_size, (2, 5))
    targets = rng.integers(0, config.vocab_size, (2, 5))
    targets[1, :2] = -100
    loss, grads = npllama.loss_and_grads(params, config, tokens, targets)
    assert sorted(grads) == sorted(params)
    assert "lm_head.weight" not in grads if tied else "lm_head.weight" in grads

    def loss_only():
        return npllama.loss_and_grads(params, config, tokens, targets)[0]

    for name, value in params.items():
        indices = rng.choice(value.size, size=min(SAMPLES_PER_TENSOR, value.size), replace=False)
        if name == "model.embed_tokens.weight":  # sample rows of tokens in the batch: others are 0
            rows = rng.choice(np.unique(tokens), SAMPLES_PER_TENSOR)
            indices = rows * config.hidden_size + rng.integers(0, config.hidden_size, SAMPLES_PER_TENSOR)
        numeric = numerical_grad(loss_only, value, indices)
        analytic = backend.to_host(grads[name]).reshape(-1)[indices]
        assert np.abs(numeric).max() > 1e-3, f"{name}: sampled gradient too small to test"
        error = relative_error(analytic, numeric)
        assert error < 1e-6, f"{name}: relative error {error:.2e}"


def test_float32_stays_float32(xp):
    """No silent upcast: float32 parameters give float32 logits and gradients."""
    config = npllama.LlamaConfig.preset("tiny")
    params = npllama.init_params(config)
    tokens = np.arange(12).reshape(2, 6)
    assert npllama.forward(params, config, tokens).dtype == np.float32
    _, grads = npllama.loss_and_grads(params, config, tokens, tokens)
    assert {str(g.dtype) for g in grads.values()} == {"float32"}


def test_init_is_seeded_and_scaled(xp):
    config = npllama.LlamaConfig.preset("tiny")
    a, b, c = (npllama.init_params(config, seed=s) for s in (0, 0, 1))
    assert all(bool((a[k] == b[k]).all()) for k in a)
    assert not bool((a["model.embed_tokens.weight"] == c["model.embed_tokens.weight"]).all())
    assert float(a["model.norm.weight"].min()) == float(a["model.norm.weight"].max()) == 1.0
    for scheme, o_expected in (("hf", 0.02), ("gpt2", 0.02 / np.sqrt(2 * config.num_hidden_layers))):
        params = npllama.init_params(config, seed=0, scheme=scheme)
        assert abs(float(params["model.layers.0.self_attn.q_proj.weight"].std()) - 0.02) < 0.002
        for name in ("self_attn.o_proj", "mlp.down_proj"):
            assert abs(float(params[f"model.layers.0.{name}.weight"].std()) - o_expected) < 0.002, (scheme, name)
    assert all(bool((a[k] == npllama.init_params(config, seed=0, scheme="hf")[k]).all()) for k in a)  # the default


def test_initial_loss_is_uniform_guess(xp):
    """A fresh model predicts nearly uniformly: loss ≈ log(V)."""
    config = npllama.LlamaConfig.preset("tiny")
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (4, 16))
    loss, _ = npllama.loss_and_grads(npllama.init_params(config), config, tokens, tokens)
    assert abs(loss - np.log(config.vocab_size)) < 0.1


@pytest.mark.parametrize("tokens, message", [
    (np.array([1, 2, 3]), "(batch, time)"),
    (np.array([[1, 64]]), "token ids must lie in [0, 64)"),
    (np.array([[1.0, 2.0]]), "must be integers"),
])
def test_bad_tokens(xp, tokens, message):
    config = npllama.LlamaConfig.preset("tiny")
    with pytest.raises(ValueError, match=re.escape(message)):
        npllama.forward(npllama.init_params(config), config, tokens)


def test_bad_targets(xp):
    config = npllama.LlamaConfig.preset("tiny")
    params = npllama.init_params(config)
    tokens = np.zeros((1, 4), dtype=np.int64)
    with pytest.raises(ValueError, match="targets must lie"):
        npllama.loss_and_grads(params, config, tokens, np.full((1, 4), 64))
    with pytest.raises(ValueError, match="every target is the ignore index"):
        npllama.loss_and_grads(params, config, tokens, np.full((1, 4), -100))
    with pytest.raises(ValueError, match="targets shape"):
        npllama.loss_and_grads(params, config, tokens, np.zeros((1, 3), dtype=np.int64))
