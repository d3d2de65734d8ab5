"""Weights kept as stored and widened block by block (streamed.py): products equal the dense ones, and
a decoder that streams its weights gives the logits of one that holds widened copies."""
import numpy as np
import pytest

from npllama import LlamaConfig, attention, backend, dtypes, generation, init_params, lora, streamed


@pytest.fixture(params=[1, 3], ids=["one core", "three workers"])
def workers(request, monkeypatch):
    """Small blocks, so every product has many, shared among this many threads."""
    monkeypatch.setattr(streamed, "BLOCK_BYTES", 5 * 8 * 8)  # 5 rows of 8 float64s or 10 of float32
    monkeypatch.setattr(backend, "usable_cores", lambda: request.param)
    return request.param


@pytest.mark.parametrize("stored_dtype", ["float32", "float16", "bf16"])
@pytest.mark.parametrize("shape", [(8,), (1, 1, 8), (2, 5, 8)])
def test_product_equals_the_widened_matrix_product(workers, rng, stored_dtype, shape):
    stored = dtypes.convert(rng.standard_normal((37, 8)), stored_dtype)
    widened = dtypes.compute_array(stored, np.float64)
    x = rng.standard_normal(shape)
    y = streamed.Streamed(stored, np.float64).product(x)
    assert y.shape == shape[:-1] + (37,) and y.dtype == np.float64
    np.testing.assert_allclose(y, x @ widened.T, rtol=1e-13, atol=1e-13)


def test_reordered_scaled_and_stacked_parts(workers, rng):
    a, b = rng.standard_normal((12, 8)).astype(np.float16), rng.standard_normal((7, 8)).astype(np.float16)
    order = rng.permutation(12)
    weight = streamed.stack([streamed.Streamed(a, np.float64)[order] * 0.25, streamed.Streamed(b, np.float64)])
    dense = np.concatenate([a.astype(np.float64)[order] * 0.25, b.astype(np.float64)])
    assert weight.shape == dense.shape
    x = rng.standard_normal((3, 8))
    np.testing.assert_allclose(weight.product(x), x @ dense.T, rtol=1e-13, atol=1e-13)
    with pytest.raises(ValueError, match="before stacking"):
        weight * 2.0


def test_fused_qkv_weight_of_streamed_projections(workers, rng):
    head_dim = 4
    wq, wk, wv = (rng.standard_normal((rows, 8)).astype(np.float16) for rows in (16, 8, 8))
    dense = attention.fused_qkv_weight(*(w.astype(np.float64) for w in (wq, wk, wv)), head_dim)
    fused = attention.fused_qkv_weight(*(streamed.Streamed(w, np.float64) for w in (wq, wk, wv)), head_dim)
    x = rng.standard_normal((1, 2, 8))
    np.testing.assert_allclose(fused.product(x), x @ dense.T, rtol=1e-13, atol=1e-13)


CONFIG = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=40)


def logits_of_each_step(params, tokens, prefill):
    decoder = generation.Decoder(params, CONFIG, len(tokens))
    steps = [decoder.advance(tokens[:prefill])] + [decoder.advance([token]) for token in tokens[prefill:]]
    return decoder, np.array([backend.to_host(logits) for logits in steps])


@pytest.mark.parametrize("stored_dtype, tolerance", [("float64", 1e-12), ("float16", 2e-6), ("bf16", 2e-6)])
def test_streaming_decoder_equals_resident_one(workers, monkeypatch, stored_dtype, tolerance):
    params = {name: dtypes.convert(value * (8 if value.ndim == 2 else 1), stored_dtype)
              for name, value in init_params(CONFIG, seed=3, dtype="float64").items()}
    tokens = list(np.random.default_rng(0).integers(0, CONFIG.vocab_size, 12))
    resident, resident_logits = logits_of_each_step(params, tokens, prefill=5)
    monkeypatch.setattr(backend, "free_memory", lambda: 0)  # too little memory for widened copies
    streaming, streamed_logits = logits_of_each_step(params, tokens, prefill=5)
    assert resident.resident and not streaming.resident
    assert streaming.streamed == (backend.device() == "cpu")  # a GPU copies each layer over instead
    scale = np.abs(resident_logits).max()
    assert np.abs(streamed_logits - resident_logits).max() <= tolerance * scale


def test_streaming_decoder_applies_lora_adapters(workers, monkeypatch, rng):
    params = {name: value * 8 if value.ndim == 2 else value
              for name, value in init_params(CONFIG, seed=3, dtype="float64").items()}
    adapters = lora.init_adapters(params, CONFIG, lora.TARGETS, rank=2, alpha=1.0, seed=1)
    adapters = {name: rng.standard_normal(value.shape) for name, value in adapters.items()}  # B not zero
    tokens = list(rng.integers(0, CONFIG.vocab_size, 9))
    _, merged = logits_of_each_step(lora.merge(params, adapters, 0.5), tokens, prefill=4)
    monkeypatch.setattr(backend, "free_memory", lambda: 0)
    decoder, unmerged = logits_of_each_step(lora.attach(params, adapters, 0.5), tokens, prefill=4)
    assert decoder.streamed == (backend.device() == "cpu")
    assert np.abs(unmerged - merged).max() <= 1e-12 * np.abs(merged).max()
