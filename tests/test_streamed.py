"""Weights kept as stored and widened block by block (runtime/streamed.py): products equal the dense ones, and
a decoder that streams its weights gives the logits of one that holds widened copies."""
import os
import threading

import numpy as np
import pytest

from npllama import LlamaConfig, adapters as lora, backend, dtypes, generation, init_params
from npllama.io import weights
from npllama.ops import linear, rope
from npllama.runtime import cpu, streamed
from tests.conftest import ROOT


@pytest.fixture(params=[1, 3], ids=["one core", "three workers"])
def workers(request, monkeypatch):
    """Small blocks, so every product has many, shared among this many threads."""
    monkeypatch.setattr(streamed, "BLOCK_BYTES", 5 * 8 * 8)  # 5 rows of 8 float64s or 10 of float32
    monkeypatch.setattr(cpu, "usable_cores", lambda: request.param)
    if request.param > 1 and not cpu.blas_threads_settable():
        pytest.skip("BLAS's thread count cannot be set here, so products run on one thread")
    return request.param


@pytest.mark.parametrize("stored_dtype", ["float32", "float16", "bf16"])
@pytest.mark.parametrize("shape", [(8,), (1, 1, 8), (2, 5, 8)])
def test_product_equals_the_widened_matrix_product(workers, rng, stored_dtype, shape):
    stored = dtypes.convert(rng.standard_normal((37, 8)), stored_dtype)
    widened = dtypes.compute_array(stored, np.float64)
    x = rng.standard_normal(shape)
    y = linear.product(x, streamed.Streamed(stored, np.float64))
    assert y.shape == shape[:-1] + (37,) and y.dtype == np.float64
    np.testing.assert_allclose(y, x @ widened.T, rtol=1e-13, atol=1e-13)


def test_memory_mapped_weight(workers, rng, tmp_path):
    stored = np.lib.format.open_memmap(tmp_path / "w.npy", mode="w+", dtype=np.float16, shape=(29, 8))
    stored[:] = rng.standard_normal((29, 8))
    x = rng.standard_normal((2, 8))
    np.testing.assert_allclose(linear.product(x, streamed.Streamed(stored, np.float64)),
                               x @ stored.astype(np.float64).T, rtol=1e-13, atol=1e-13)


def test_reordered_scaled_and_stacked_parts(workers, rng):
    """A Fused weight of streamed parts (each part's own product, its columns reordered and scaled)
    computes what the stacked dense matrix does."""
    a, b = rng.standard_normal((12, 8)).astype(np.float16), rng.standard_normal((7, 8)).astype(np.float16)
    order = rng.permutation(12)
    weight = linear.Fused([(streamed.Streamed(a, np.float64), order, 0.25), (streamed.Streamed(b, np.float64),)])
    dense = np.concatenate([a.astype(np.float64)[order] * 0.25, b.astype(np.float64)])
    assert weight.shape == dense.shape and weight.stacked is None
    x = rng.standard_normal((3, 8))
    np.testing.assert_allclose(linear.product(x, weight), x @ dense.T, rtol=1e-13, atol=1e-13)
    with pytest.raises(ValueError, match="must be a permutation of its 12 rows"):
        linear.Fused([(streamed.Streamed(a, np.float64), np.array([0, 12] + list(range(2, 12))))])
    with pytest.raises(TypeError, match="has no backward"):
        linear.backward(np.ones((3, 19)), linear.forward(x, weight)[1])


def test_weight_without_rows(workers):
    y = linear.product(np.ones((3, 8), np.float32), streamed.Streamed(np.zeros((0, 8), np.float16), np.float32))
    assert y.shape == (3, 0)


@pytest.mark.skipif(not cpu.blas_threads_settable(), reason="BLAS's thread count cannot be set here")
def test_blas_threads_restored_after_overlapping_products(workers, rng):
    set_threads, get_threads = cpu._blas_thread_control()
    before = get_threads()
    set_threads(2)
    try:
        weight = streamed.Streamed(rng.standard_normal((64, 8)).astype(np.float16), np.float32)
        x = rng.standard_normal((1, 8)).astype(np.float32)
        threads = [threading.Thread(target=lambda: [linear.product(x, weight) for _ in range(30)]) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert get_threads() == 2
    finally:
        set_threads(before)


def test_fused_qkv_weight_of_streamed_projections(workers, rng):
    head_dim = 4
    wq, wk, wv = (rng.standard_normal((rows, 8)).astype(np.float16) for rows in (16, 8, 8))

    def fused(weight):
        return linear.Fused([(weight(wq), rope.pair_order(16, head_dim), head_dim ** -0.5),
                             (weight(wk), rope.pair_order(8, head_dim)), (weight(wv),)])
    dense = fused(lambda w: w.astype(np.float64))
    x = rng.standard_normal((1, 2, 8))
    assert dense.stacked is not None
    np.testing.assert_allclose(linear.product(x, fused(lambda w: streamed.Streamed(w, np.float64))),
                               x @ dense.stacked.T, rtol=1e-13, atol=1e-13)


CONFIG = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=40)


def logits_of_each_step(params, tokens, prefill, config=CONFIG):
    decoder = generation.Decoder(params, config, len(tokens))
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


def test_streaming_decoder_builds_lazily_imported_layers_as_they_run(workers, monkeypatch):
    """llama2.c int8 weights are dequantized on access: streaming must not hold them all."""
    config, params, _ = weights.load(os.path.join(ROOT, "tests", "fixtures", "import", "stories_v2.bin"))
    tokens = [1, 5, 9, 2, 7]
    _, resident_logits = logits_of_each_step(params, tokens, prefill=2, config=config)
    resident_tokens = generation.generate(params, config, tokens, 6)
    monkeypatch.setattr(backend, "free_memory", lambda: 0)
    decoder, streamed_logits = logits_of_each_step(params, tokens, prefill=2, config=config)
    assert decoder.weights.kept is None
    assert np.abs(streamed_logits - resident_logits).max() <= 1e-5 * np.abs(resident_logits).max()
    assert generation.generate(params, config, tokens, 6) == resident_tokens


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
