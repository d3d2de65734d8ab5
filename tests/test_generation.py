"""KV-cache generation: the cached logits are the full forward's, greedy decoding matches a full
re-forward and HF transformers' generate, the sampler's steps (repeat penalty, top-k, top-p, min-p,
temperature) give the probabilities computed here by hand and it draws from them, the context shift
continues past the context as a full forward over the window would, stop strings end the text, and
several samples share one prefill."""
import os
import re

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


# ---- the sampler's steps, against values computed here --------------------------------------------------
PROBS = np.array([0.5, 0.2, 0.15, 0.1, 0.05])


def test_top_p_and_min_p_act_before_the_temperature():
    """llama.cpp's order: top-p keeps 0.5 + 0.2 + 0.15 >= 0.8 at temperature 1, then p ∝ q^(1/τ)."""
    logits = np.log(PROBS)
    kept = PROBS[:3] ** 2  # τ = 0.5
    np.testing.assert_allclose(generation.Sampler(0.5, top_p=0.8).probabilities(logits),
                               np.r_[kept / kept.sum(), 0, 0])
    kept = PROBS[:2] ** (1 / 2.0)  # min-p 0.35 keeps q >= 0.35 · 0.5 = 0.175; τ = 2
    np.testing.assert_allclose(generation.Sampler(2.0, min_p=0.35).probabilities(logits),
                               np.r_[kept / kept.sum(), 0, 0, 0])


def test_min_p_keeps_tokens_at_least_that_fraction_of_the_most_likely():
    logits = np.log(PROBS)
    for min_p, kept in ((0.25, 3), (0.15, 4), (0.11, 4), (0.09, 5), (1.0, 1)):  # 0.25 · 0.5 = 0.125 ...
        expected = np.r_[PROBS[:kept], np.zeros(5 - kept)]
        np.testing.assert_allclose(generation.Sampler(1.0, min_p=min_p).probabilities(logits),
                                   expected / expected.sum(), err_msg=str(min_p))


def test_top_k_comes_before_top_p():
    """top-k 2 leaves q = (0.5, 0.2) / 0.7 = (0.714, 0.286): top-p 0.65 then keeps the first alone (top-p
    first would have kept two: 0.5 < 0.65 <= 0.7)."""
    np.testing.assert_allclose(generation.Sampler(1.0, top_k=2, top_p=0.65).probabilities(np.log(PROBS)),
                               [1, 0, 0, 0, 0])


def test_off_values_turn_each_step_off():
    logits = np.log(PROBS)
    sampler = generation.Sampler(1.0, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.0)
    np.testing.assert_allclose(sampler.probabilities(logits, previous=[0, 1, 2]), PROBS)


def test_repeat_penalty_divides_positive_and_multiplies_negative_logits_of_recent_ids():
    """llama.cpp: for each id among the last repeat_last_n (once, however often it came), l / ρ when
    l > 0, else l · ρ. Ids past the vocabulary in the history are ignored."""
    logits = np.array([2.0, -1.0, 0.5, 3.0, -2.0])
    previous = [0, 3, 1, 2, 2, 99]  # the last 4: 1, 2, 2, 99
    penalised = np.array([2.0, -1.0 * 2, 0.5 / 2, 3.0, -2.0])
    sampler = generation.Sampler(1.0, repeat_penalty=2.0, repeat_last_n=4)
    np.testing.assert_allclose(sampler.probabilities(logits, previous), np.exp(penalised) / np.exp(penalised).sum())
    assert generation.Sampler(1.0, repeat_penalty=2.0, repeat_last_n=0).probabilities(logits, previous) == \
        pytest.approx(np.exp(logits) / np.exp(logits).sum())


def test_the_repeat_penalty_acts_on_greedy_decoding():
    logits = np.array([3.0, 2.9, -1.0])
    assert generation.Sampler(0.0, repeat_penalty=1.1)(logits, previous=[2]) == 0
    assert generation.Sampler(0.0, repeat_penalty=1.1)(logits, previous=[0]) == 1  # 3.0 / 1.1 < 2.9


def greedy_with_repeat_penalty(params, config, prompt, steps, penalty, last_n):
    """A full forward at every step, the prompt's ids and the new ones penalised as llama.cpp does."""
    sequence = list(prompt)
    for _ in range(steps):
        logits = backend.to_host(forward(params, config, np.array([sequence]))[0, -1]).astype(np.float64)
        for token in set(sequence[-last_n:]):
            logits[token] = logits[token] / penalty if logits[token] > 0 else logits[token] * penalty
        sequence.append(int(np.argmax(logits)))
    return sequence[len(prompt):]


def test_generation_penalises_the_prompt_and_the_new_tokens(model):
    config, params = model
    prompt = [5, 17, 3, 17]
    new = generation.generate(params, config, prompt, 20, repeat_penalty=1.5, repeat_last_n=6)
    assert new == greedy_with_repeat_penalty(params, config, prompt, 20, 1.5, 6)
    assert new != generation.generate(params, config, prompt, 20)  # the premise: the penalty changed something


@pytest.mark.parametrize("settings, fragment", [
    ({"min_p": 1.5}, "min-p must lie in [0, 1]"), ({"repeat_penalty": 0.0}, "repeat penalty must be a positive"),
    ({"repeat_last_n": -1}, "repeat-last-n must be a non-negative integer"), ({"top_k": -1}, "top-k must be"),
    ({"num_samples": 0}, "num_samples must be a positive integer"), ({"keep_first": 30}, "keep_first must be at most"),
])
def test_bad_sampling_settings_are_refused(model, settings, fragment):
    config, params = model
    with pytest.raises(generation.GenerationError, match=re.escape(fragment)):
        generation.stream(params, config, [1], 5, temperature=1.0, **settings)


def test_an_unseeded_run_says_its_seed_and_that_seed_repeats_it(model):
    config, params = model
    tokens, stats = generation.stream(params, config, [1], 20, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    first = list(tokens)
    assert isinstance(stats.seed, int) and stats.summary().endswith(f"; seed {stats.seed}")
    assert generation.generate(params, config, [1], 20, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
                               seed=stats.seed) == first
    assert generation.stream(params, config, [1], 5)[1].seed is None  # greedy: no seed to say


# ---- beyond the context ---------------------------------------------------------------------------------
@pytest.fixture
def short_model():
    """The fixture model's shape with a context of 16 positions."""
    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16)
    params = init_params(config, seed=3, dtype="float64")
    return config, {name: value * 8 if value.ndim == 2 else value for name, value in params.items()}


def greedy_over_a_sliding_window(params, config, prompt, steps, keep_first):
    """A full forward over the window at every step (positions from 0): when the window outgrows the
    context it becomes its first keep_first ids and the last (context - keep_first) // 2."""
    context = config.max_position_embeddings
    window, new, shifts = list(prompt), [], 0
    for _ in range(steps):
        if len(window) > context:
            window = window[:keep_first] + window[-((context - keep_first) // 2):]
            shifts += 1
        token = int(np.argmax(backend.to_host(forward(params, config, np.array([window]))[0, -1])))
        new.append(token)
        window.append(token)
    return new, shifts


@pytest.mark.parametrize("keep_first", [0, 1])
def test_a_context_shift_continues_as_a_forward_over_the_window(short_model, keep_first):
    config, params = short_model
    prompt = [1, 7, 30]
    tokens, stats = generation.stream(params, config, prompt, 40, context_shift=True, keep_first=keep_first)
    expected, shifts = greedy_over_a_sliding_window(params, config, prompt, 40, keep_first)
    assert list(tokens) == expected and stats.stop_reason == "length" and stats.new_tokens == 40
    assert stats.context_shifts == shifts >= 2
    assert stats.shift_window == keep_first + (16 - keep_first) // 2
    assert f"{shifts} context shifts re-ran {shifts * stats.shift_window} tokens" in stats.summary()


def test_without_the_shift_generation_stops_at_the_context(short_model):
    config, params = short_model
    tokens, stats = generation.stream(params, config, [1, 7, 30], 40)
    assert len(list(tokens)) == 16 - 3 + 1 and stats.stop_reason == "context" and stats.context_shifts == 0


def test_the_window_is_run_as_a_fresh_prefill_of_its_tokens(short_model, monkeypatch):
    config, params = short_model
    runs = []
    advance = generation.Decoder.advance
    monkeypatch.setattr(generation.Decoder, "advance",
                        lambda self, ids: runs.append((list(ids), advance(self, ids))) or runs[-1][1])
    sequence = [1, 7, 30] + generation.generate(params, config, [1, 7, 30], 20, context_shift=True, keep_first=1)
    window, logits = next(run for run in runs[1:] if len(run[0]) > 1)  # the first re-prefill
    assert window == sequence[:1] + sequence[17 - 7:17]  # BOS and the last (16 - 1) // 2 of the 17 so far
    monkeypatch.setattr(generation.Decoder, "advance", advance)
    fresh = generation.Decoder(params, config, 16).advance(window)
    np.testing.assert_array_equal(backend.to_host(logits), backend.to_host(fresh))
    full = backend.to_host(forward(params, config, np.array([window]))[0, -1])
    np.testing.assert_allclose(backend.to_host(logits), full, rtol=1e-12, atol=1e-12)


# ---- several samples --------------------------------------------------------------------------------------
def test_samples_are_the_runs_seeded_one_after_the_other_and_share_the_prefill(model, monkeypatch):
    config, params = model
    settings = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    singles = [generation.generate(params, config, [4, 9], 12, seed=seed, **settings) for seed in (20, 21, 22)]
    runs = []
    advance = generation.Decoder.advance
    monkeypatch.setattr(generation.Decoder, "advance", lambda self, ids: runs.append(len(ids)) or advance(self, ids))
    samples = [(list(tokens), stats) for tokens, stats in
               generation.samples(params, config, [4, 9], 12, seed=20, num_samples=3, **settings)]
    assert [tokens for tokens, _ in samples] == singles and len(set(map(tuple, singles))) == 3
    assert [stats.seed for _, stats in samples] == [20, 21, 22]
    assert [stats.cached_tokens for _, stats in samples] == [0, 2, 2]
    assert runs == [2] + [1] * 11 * 3  # one prefill, then one position per step


def test_a_sample_after_a_context_shift_runs_its_prompt_again(short_model):
    config, params = short_model
    samples = [(list(tokens), stats) for tokens, stats in
               generation.samples(params, config, [1, 7, 30], 30, context_shift=True, num_samples=2)]
    assert samples[0][0] == samples[1][0]  # greedy
    assert samples[1][1].cached_tokens == 0 and samples[1][1].context_shifts == samples[0][1].context_shifts > 0


# ---- stop strings -----------------------------------------------------------------------------------------
def test_stop_strings_hold_back_what_may_begin_one():
    stops = generation.StopStrings(["lo w", "xyz"])
    assert stops.push("Hel") == "He"  # "l" may begin "lo w"
    assert stops.push("lo") == "l"  # of "llo", "lo" may begin it
    assert stops.push(" wor") == "" and stops.stopped  # "lo wor" begins with it
    again = generation.StopStrings(["lo w"])
    assert [again.push(piece) for piece in ("Hel", "p!")] == ["He", "lp!"] and again.flush() == ""
    with pytest.raises(generation.GenerationError, match="a stop string must not be empty"):
        generation.StopStrings([""])


class PieceDecoder:
    """A stream decoder whose ids are indices into a list of texts."""

    def __init__(self, pieces):
        self.pieces = pieces

    def push(self, token):
        return self.pieces[token]

    def flush(self):
        return ""


def test_stream_text_stops_at_a_string_spanning_two_tokens_and_closes_the_tokens():
    pieces = ["Once", " up", "on a", " time", " there"]
    produced = []

    def tokens():
        for token in range(len(pieces)):
            produced.append(token)
            yield token
    stats = generation.GenerationStats(prompt_tokens=1)
    text = "".join(generation.stream_text(tokens(), stats, PieceDecoder(pieces), stop=["pon a t"]))
    assert text == "Once u" and stats.stop_reason == "stop" and produced == [0, 1, 2, 3]
    stats = generation.GenerationStats(prompt_tokens=1, stop_reason="length")
    text = "".join(generation.stream_text(iter(range(5)), stats, PieceDecoder(pieces), stop=["never"]))
    assert text == "".join(pieces) and stats.stop_reason == "length"
