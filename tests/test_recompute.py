"""Activation recomputation (model.loss_and_grads(..., recompute=True)): the forward keeps only each
block's input and the backward runs each block's forward again. The gradients equal the stored
activations' bit for bit (the same operations on the same values, in the same order), match finite
differences in float64, and the memory kept drops to the block inputs."""
import tracemalloc

import numpy as np
import pytest

import npllama
from npllama import adapters, backend, model
from npllama.runtime.quantized import quantize
from tests.conftest import array_bytes
from tests.gradcheck import numerical_grad, relative_error
from tests.test_model_gradcheck import random_params

GQA = dict(vocab_size=13, hidden_size=16, intermediate_size=20, num_hidden_layers=3, num_attention_heads=4,
           num_key_value_heads=2)


def gqa_config(tied=False):
    return npllama.LlamaConfig(**GQA, tie_word_embeddings=tied)


def batch(rng, config, shape=(2, 6)):
    tokens, targets = rng.integers(0, config.vocab_size, (2, *shape))
    targets[1, :2] = -100
    return tokens, targets


def assert_same_loss_and_grads(params, config, tokens, targets):
    """loss_and_grads with and without recompute: equal losses and every gradient equal bit for bit."""
    stored_loss, stored = npllama.loss_and_grads(params, config, tokens, targets, scale=0.7)
    loss, grads = npllama.loss_and_grads(params, config, tokens, targets, scale=0.7, recompute=True)
    assert loss == stored_loss
    assert list(grads) == list(stored)
    for name, grad in grads.items():
        assert grad.dtype == stored[name].dtype and np.array_equal(backend.to_host(grad), backend.to_host(stored[name])), name
    return grads


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_recompute_gives_the_stored_gradients_bit_for_bit(xp, rng, dtype, tied):
    config = gqa_config(tied)
    params = {name: value.astype(dtype) for name, value in random_params(config, xp, rng).items()}
    grads = assert_same_loss_and_grads(params, config, *batch(rng, config))
    assert sorted(grads) == sorted(params)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_recompute_with_lora_adapters_bit_for_bit(xp, rng, tied):
    config = gqa_config(tied)
    params = random_params(config, xp, rng)
    lora = {name: xp.asarray(rng.standard_normal(value.shape) * 0.5)  # B ≠ 0: every path through them
            for name, value in adapters.init_adapters(params, config, adapters.TARGETS, 3, 6.0, seed=1).items()}
    grads = assert_same_loss_and_grads(adapters.attach(params, lora, 2.0), config, *batch(rng, config))
    assert sorted(grads) == sorted(lora)


def test_recompute_over_a_quantized_base_bit_for_bit(rng):
    """LoRA adapters over a q8_0 base (the base's products widened block by block, as stored)."""
    config = npllama.LlamaConfig(**{**GQA, "hidden_size": 64, "intermediate_size": 96, "vocab_size": 64})
    base = {name: quantize(value, "q8_0") if value.ndim == 2 else value
            for name, value in npllama.init_params(config).items()}
    lora = {name: (rng.standard_normal(value.shape) * 0.1).astype(np.float32)
            for name, value in adapters.init_adapters(npllama.init_params(config), config, ("q_proj", "down_proj"),
                                                      4, 8.0, seed=1).items()}
    grads = assert_same_loss_and_grads(adapters.attach(base, lora, 2.0), config, *batch(rng, config))
    assert sorted(grads) == sorted(lora)


def test_recomputed_hidden_states_backward_any_gradient(xp, rng):
    """hidden_states_for_training(recompute=True) + stack_backward for a gradient dh of another loss
    (here only each row's last position, as a classifier's): the stored caches' gradients."""
    config = gqa_config()
    params = random_params(config, xp, rng)
    tokens = rng.integers(0, config.vocab_size, (2, 6))
    dh = xp.zeros((2, 6, config.hidden_size))
    dh[:, -1] = xp.asarray(rng.standard_normal((2, config.hidden_size)))
    h, stored_caches = model.hidden_states_for_training(params, config, tokens)
    h_again, caches = model.hidden_states_for_training(params, config, tokens, recompute=True)
    assert np.array_equal(backend.to_host(h), backend.to_host(h_again))
    stored, grads = model.stack_backward(dh, stored_caches), model.stack_backward(dh, caches)
    assert list(grads) == list(stored)
    assert all(np.array_equal(backend.to_host(grads[name]), backend.to_host(stored[name])) for name in grads)


def test_recompute_gradients_match_finite_differences(xp, rng):
    config = gqa_config()
    params = random_params(config, xp, rng)
    tokens, targets = batch(rng, config)
    _, grads = npllama.loss_and_grads(params, config, tokens, targets, recompute=True)

    def loss_only():
        return model.loss(params, config, tokens, targets)
    for name, value in params.items():
        indices = rng.choice(value.size, size=3, replace=False)
        if name == "model.embed_tokens.weight":  # rows of tokens in the batch: the others' gradient is 0
            indices = rng.choice(np.unique(tokens), 3) * config.hidden_size + rng.integers(0, config.hidden_size, 3)
        numeric = numerical_grad(loss_only, value, indices)
        assert np.abs(numeric).max() > 1e-3, f"{name}: sampled gradient too small to test"
        error = relative_error(backend.to_host(grads[name]).reshape(-1)[indices], numeric)
        assert error < 1e-6, f"{name}: relative error {error:.2e}"


# ---- memory ---------------------------------------------------------------------------------------
MEMORY_CONFIG = npllama.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=172, num_hidden_layers=6,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def test_recompute_keeps_only_the_block_inputs():
    config = MEMORY_CONFIG
    params = npllama.init_params(config)
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (4, 64))
    _, stored = model.hidden_states_for_training(params, config, tokens)
    _, caches = model.hidden_states_for_training(params, config, tokens, recompute=True)
    inputs = config.num_hidden_layers * tokens.size * config.hidden_size * 4  # L·B·T·D float32
    assert [x.shape for x in caches.blocks] == [(4, 64, config.hidden_size)] * config.num_hidden_layers
    assert array_bytes(caches.blocks, set()) == inputs
    assert array_bytes(stored.blocks, set()) > 5 * inputs  # each block's cache: ~6D + 3Dₖᵥ + 4F + H·T a token


def peak_bytes(call):
    """The largest total of traced allocations (NumPy's arrays among them) while call() runs."""
    tracemalloc.start()
    try:
        call()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_recompute_lowers_the_peak_memory_of_a_step():
    config = MEMORY_CONFIG
    params = npllama.init_params(config)
    tokens, targets = np.random.default_rng(0).integers(0, config.vocab_size, (2, 4, 64))
    stored, recomputed = (peak_bytes(lambda: npllama.loss_and_grads(params, config, tokens, targets, recompute=flag))
                          for flag in (False, True))
    assert recomputed < 0.5 * stored, (recomputed, stored)
