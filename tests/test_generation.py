"""KV-cache generation: the cached logits are the full forward's, greedy decoding matches a full
re-forward and HF transformers' generate, and the sampler draws from the distribution it says."""
import os

import numpy as np
import pytest

from npllama import LlamaConfig, backend, forward, generation, init_params
from npllama.io import weights
from tests.conftest import ROOT

FIXTURES = os.path.join(ROOT, "tests", "fixtures", "import")
STORIES260K = os.path.join(ROOT, "..", "shared", "data", "stories260K.bin")
EXPECTED = np.load(os.path.join(FIXTURES, "expected.npz"))


@pytest.fixture
def model(xp):
    """A small float64 GQA model with weights large enough that its logits are far from uniform."""
    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=40)
    params = init_params(config, seed=3, dtype="float64")
    return config, {name: value * 8 if value.ndim == 2 else value for name, value in params.items()}


def greedy_by_full_forward(params, config, prompt, steps):
    sequence = list(prompt)
    for _ in range(steps):
        logits = backend.to_host(forward(params, config, np.array([sequence]))[0, -1])
        sequence.append(int(np.argmax(logits)))
    return sequence[len(prompt):]


def assert_cached_logits_equal_forward(params, config, tokens, prefill, tolerance):
    full = backend.to_host(forward(params, config, np.array([tokens]))[0])
    decoder = generation.Decoder(params, config, len(tokens))
    steps = [decoder.advance(tokens[:prefill])] + [decoder.advance([token]) for token in tokens[prefill:]]
    for position, logits in zip(range(prefill - 1, len(tokens)), steps):
        error = np.abs(backend.to_host(logits) - full[position]).max()
        assert error <= tolerance * np.abs(full[position]).max(), (position, error)


def test_kv_cache_logits_equal_full_forward(model):
    config, params = model
    tokens = list(np.random.default_rng(0).integers(0, config.vocab_size, 30))
    assert_cached_logits_equal_forward(params, config, tokens, prefill=7, tolerance=1e-12)


def test_greedy_with_cache_equals_greedy_by_full_forward(model):
    config, params = model
    prompt = [5, 17, 3]
    new = generation.generate(params, config, prompt, 25)
    assert new == greedy_by_full_forward(params, config, prompt, 25)
    assert len(set(new)) > 3  # not a degenerate repetition that any bug could reproduce


@pytest.mark.parametrize("source,prefix", [("hf", ""), ("stories_tied.bin", "tied/"), ("stories_v2.bin", "v2/")])
def test_greedy_equals_hf_transformers_generate(source, prefix):
    config, params, _ = weights.load(os.path.join(FIXTURES, source))
    new = generation.generate(params, config, EXPECTED["prompt"], len(EXPECTED[prefix + "generated"]))
    assert new == EXPECTED[prefix + "generated"].tolist()


def test_stories260k_cache_equals_forward_and_greedy_is_deterministic():
    config, params, _ = weights.load(STORIES260K)
    params = {name: backend.to_device(np.asarray(params[name])) for name in params}
    first = generation.generate(params, config, [1], 60)
    assert first == generation.generate(params, config, [1], 60)
    assert first == greedy_by_full_forward(params, config, [1], 60)
    assert_cached_logits_equal_forward(params, config, [1] + first, prefill=1, tolerance=1e-5)


# ---- stopping ----------------------------------------------------------------------------------------
def test_stops_after_eos_and_reports_why(model):
    config, params = model
    greedy = generation.generate(params, config, [1, 2], 10)
    eos = greedy[4]
    tokens, stats = generation.stream(params, config, [1, 2], 10, eos_ids=eos)
    assert list(tokens) == greedy[:greedy.index(eos) + 1] and stats.stop_reason == "eos"


def test_stops_when_the_context_is_full(model):
    config, params = model
    tokens, stats = generation.stream(params, config, list(range(35)), 100)
    assert len(list(tokens)) == config.max_position_embeddings - 35 + 1 and stats.stop_reason == "context"
    summary = stats.summary()
    assert "prompt 35 tokens, 6 new (context)" in summary and "prefill" in summary and "decode" in summary


def test_bad_arguments_are_refused_before_any_work(model):
    config, params = model
    with pytest.raises(generation.GenerationError, match="the prompt has 41 tokens, more than the model's context of 40"):
        generation.stream(params, config, [1] * 41, 5)
    with pytest.raises(generation.GenerationError, match="empty"):
        generation.stream(params, config, [], 5)
    with pytest.raises(generation.GenerationError, match=r"\[0, 50\)"):
        generation.stream(params, config, [50], 5)
    with pytest.raises(generation.GenerationError, match="top-p"):
        generation.stream(params, config, [1], 5, temperature=1.0, top_p=1.5)
    assert generation.generate(params, config, [1], 0) == []


# ---- the sampler -------------------------------------------------------------------------------------
def test_seeded_sampling_repeats_and_seeds_differ(model):
    config, params = model
    runs = [generation.generate(params, config, [1], 30, temperature=1.0, seed=seed) for seed in (7, 7, 8)]
    assert runs[0] == runs[1] != runs[2]


def test_top_k_one_and_tiny_top_p_are_greedy(model):
    config, params = model
    greedy = generation.generate(params, config, [4], 15)
    assert generation.generate(params, config, [4], 15, temperature=2.0, top_k=1, seed=0) == greedy
    assert generation.generate(params, config, [4], 15, temperature=2.0, top_p=1e-9, seed=0) == greedy


def test_sampler_probabilities_follow_temperature_top_k_and_top_p():
    logits = np.log(np.array([0.5, 0.2, 0.15, 0.1, 0.05]))
    np.testing.assert_allclose(generation.Sampler(1.0).probabilities(logits.copy()), np.exp(logits))
    tempered = np.exp(logits / 0.5) / np.exp(logits / 0.5).sum()
    np.testing.assert_allclose(generation.Sampler(0.5).probabilities(logits.copy()), tempered)
    np.testing.assert_allclose(generation.Sampler(1.0, top_k=2).probabilities(logits.copy()),
                               [0.5 / 0.7, 0.2 / 0.7, 0, 0, 0])
    # top-p 0.8 keeps the smallest set reaching 0.8: 0.5 + 0.2 + 0.15 = 0.85
    np.testing.assert_allclose(generation.Sampler(1.0, top_p=0.8).probabilities(logits.copy()),
                               [0.5 / 0.85, 0.2 / 0.85, 0.15 / 0.85, 0, 0])


def test_draws_follow_the_probabilities():
    logits = np.log(np.array([0.5, 0.2, 0.15, 0.1, 0.05]))
    sampler = generation.Sampler(1.0, seed=0)
    counts = np.bincount([sampler(logits) for _ in range(20000)], minlength=5) / 20000
    np.testing.assert_allclose(counts, np.exp(logits), atol=0.012)  # ~4 standard errors


def test_decoding_keeps_the_embedding_table_made_when_read():
    """A table made when read (a dequantized GGUF) is made once, not at every token."""
    from npllama.io.common import LazyTensors
    config = LlamaConfig.preset("tiny")
    stored = init_params(config)
    made = []
    params = LazyTensors()
    for name, value in stored.items():
        params.add(name, value.dtype, value.shape, lambda name=name: made.append(name) or stored[name])
    list(generation.stream(params, config, [1, 2], 5)[0])
    assert made.count("model.embed_tokens.weight") == 1
