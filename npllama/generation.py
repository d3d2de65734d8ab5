"""Text generation: the model run over a KV cache, and the sampler (sampling.py) kept apart from it.

Decoding one sequence:
    prefill   logits = Model(prompt)            the whole prompt in one batched forward; every layer's
                                                keys and values go into the KV cache
    step      token  = sample(logits)           sampling.py
              logits = Model(token | cache)     one position: its q, k, v against the cached k, v
Both are model.run_stack, the stack that training runs, given the cache. The cache makes each step cost
O(one position) instead of re-running the whole sequence; the logits are the same as a full forward's
(tests/test_generation.py checks it).

Beyond the context (context_shift): when the cache is full and more tokens are wanted, generation goes
on from a window: the prompt's first keep_first tokens (BOS, which llama.cpp keeps too) and the latest
half of the rest, run again as a fresh prefill at positions 0, 1, ... so that RoPE sees positions the
model was trained on. llama.cpp's context shift keeps the same tokens but rotates the cached keys to
their new positions instead; a re-run is exact by construction. Why half: the re-run costs one batched
forward over half a context, and is needed again only after another half a context of new tokens, so
it adds about one batched position per new token; keeping more (the last context − 1) would re-run
nearly the whole window at every token, keeping less forgets more of the text at each shift.

Text: stream_text turns the new ids into text as it is made, and ends it before the first stop string
(StopStrings holds back a piece's end that may begin one, so no part of a stop string is ever shown).

What is generation's own: the cache's allocation, and where the weights live. They are read in the
dtype they are stored in and computed in `dtype` (float32 on the CPU: NumPy has no fast float16 matrix
product and no bfloat16). When the computed copies fit in half the free memory they are made once.
Otherwise (Llama-2-7B in float16 on a 24 GB CPU machine) each layer's weights are taken when it runs:
the CPU multiplies by them as stored, widening a block of rows at a time (runtime/streamed.py), so
memory holds the memory-mapped file and at most one layer that importing rebuilds (io LazyTensors);
a GPU copies each layer's weights over.
"""
import dataclasses
import time
from typing import Optional

import numpy as np

from . import backend, dtypes, model
from .runtime.streamed import Streamed
from .sampling import DEFAULTS, GenerationError, Sampler, random_seed  # noqa: F401 (the error: this module's too)


class Decoder:
    """One sequence's forward passes over a KV cache of max_len positions.

    advance(tokens) runs the next tokens (the prompt, then one at a time) and returns the logits (V,)
    that predict the token after the last of them."""

    def __init__(self, params, config, max_len, dtype=None):
        self.config = config
        self.dtype = dtypes.resolve(dtype) if dtype is not None else _default_dtype(params)
        if self.dtype == dtypes.BFLOAT16:
            raise GenerationError("NumPy and CuPy cannot compute in bf16; compute in fp32 (bf16 weights are widened)")
        xp = backend.xp()
        computed_bytes = config.num_parameters() * self.dtype.itemsize
        # Resident: computed copies made once. Otherwise each layer's weights are made when it runs
        # (a lazily imported tensor is built then, and dropped after): on the CPU multiplied by as
        # stored (streamed), on a GPU copied over.
        self.resident = computed_bytes <= backend.free_memory() // 2
        self.streamed = not self.resident and xp is np
        self.weights = model.Weights(params, config, self.dtype, self._computed, keep=self.resident, xp=xp)
        self.cache = model.KVCache(config, 1, max_len, self.dtype, xp)
        self.weights.rotation(0, max_len)
        if self.resident:  # prepared now, so that prefill's time is the model's
            for layer in range(config.num_hidden_layers):
                self.weights.block(layer)
            self.weights.embedding, self.weights.final_norm, self.weights.head

    def _computed(self, array, matrix):
        """A stored array as it is computed with: on the device in the compute dtype, or (a matrix,
        when streaming) multiplied by as stored."""
        if matrix and self.streamed:
            return Streamed(array, self.dtype)
        return backend.to_device(dtypes.compute_array(array, self.dtype))

    def rewind(self, length):
        """Forget the positions from `length` on (the cache keeps the first `length`)."""
        self.cache.length = min(self.cache.length, length)

    def advance(self, tokens):
        end = self.cache.length + len(tokens)
        if end > self.cache.max_len:
            raise GenerationError(f"{end} positions do not fit the KV cache of {self.cache.max_len}")
        h, _ = model.run_stack(self.weights, np.asarray([tokens]), self.cache)
        return model.logits(self.weights, h[0, -1])  # only the last position predicts


def _default_dtype(params):
    """The model's (float64 stays float64, all else float32), but float16 on a GPU when stored so."""
    if backend.device() == "cuda" and model.stored_dtype(params) == np.float16:
        return np.dtype(np.float16)
    return model.default_dtype(params)


# ---- generation -------------------------------------------------------------------------------------
@dataclasses.dataclass
class GenerationStats:
    prompt_tokens: int
    cached_tokens: int = 0  # of the prompt's, those a kept KV cache already held (chat, samples): not run again
    new_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0  # the steps' own: context shifts' re-runs are counted apart
    stop_reason: str = ""  # "length", "eos", "context" or "stop" (a stop string: stream_text)
    seed: Optional[int] = None  # the sampler's; None when greedy
    context_shifts: int = 0  # times the context filled and generation went on from a window
    shift_window: int = 0  # the tokens each of them ran again
    shift_seconds: float = 0.0

    def summary(self):
        """One line: tokens and speeds, the context shifts, the seed."""
        # The first new token comes from the prefill's logits, the one after each shift from its window's.
        steps = self.new_tokens - 1 - self.context_shifts
        cached = f" ({self.cached_tokens} cached)" if self.cached_tokens else ""
        line = (f"prompt {self.prompt_tokens} tokens{cached}, {self.new_tokens} new ({self.stop_reason}); "
                f"prefill {_rate(self.prompt_tokens - self.cached_tokens, self.prefill_seconds)}, "
                f"decode {_rate(steps, self.decode_seconds)}")
        if self.context_shifts:
            rerun = self.context_shifts * self.shift_window
            line += (f"; {self.context_shifts} context shift{'s' * (self.context_shifts > 1)} re-ran {rerun} "
                     f"tokens ({_rate(rerun, self.shift_seconds)})")
        if self.seed is not None:
            line += f"; seed {self.seed}"
        return line


def _rate(tokens, seconds):
    if tokens <= 0 or seconds <= 0:
        return "n/a"
    rate = tokens / seconds
    return f"{rate:,.1f} tok/s" if rate >= 1 else f"{rate:.3g} tok/s"


@dataclasses.dataclass(frozen=True)
class ContextShift:
    """The window generation goes on from when the context is full (module docstring): the prompt's
    first keep_first tokens (BOS) and the latest half of the rest."""
    context: int
    keep_first: int = 0

    @property
    def latest(self):
        return max(1, (self.context - self.keep_first) // 2)

    def window(self, sequence):
        """Of the ids so far (prompt and new), those the cache is to hold, the newest last."""
        return sequence[:self.keep_first] + sequence[-self.latest:]


def samples(params, config, prompt_ids, max_new_tokens, temperature=0.0, top_k=DEFAULTS["top_k"],
            top_p=DEFAULTS["top_p"], seed=None, eos_ids=(), dtype=None, vocab_limit=None, min_p=DEFAULTS["min_p"],
            repeat_penalty=DEFAULTS["repeat_penalty"], repeat_last_n=DEFAULTS["repeat_last_n"],
            context_shift=False, keep_first=0, num_samples=1):
    """An iterator over num_samples continuations of one prompt, each a (tokens, stats) pair as stream()
    returns, the i-th sampled with seed + i (seed chosen at random when None: stats.seed says it).

    Sampling (sampling.py): greedy at temperature 0, the default, for exact, repeatable output (as
    transformers' generate); at a temperature > 0 the other settings' defaults are llama.cpp's.
    A continuation stops after max_new_tokens, after any of eos_ids (an id or ids; included), or when
    the model's context is full; with context_shift it goes on instead from a window of its latest
    tokens (ContextShift; keep_first: the prompt's first tokens every window keeps, as llama.cpp keeps
    BOS: pass 1 when the prompt begins with it). Ids from vocab_limit on (embedding rows past the
    tokenizer's last id) are never sampled. Arguments are checked here, before the first token.

    The continuations share one KV cache: take the next pair once done with the last one's tokens
    (taking it closes them). One that did not shift the context leaves the prompt's keys and values to
    the next, which then runs no prefill (its stats count the prompt as cached)."""
    prompt = _checked_prompt(prompt_ids, config)
    _check_count("max_new_tokens", max_new_tokens, least=0)
    _check_count("num_samples", num_samples, least=1)
    context = config.max_position_embeddings
    _check_count("keep_first", keep_first, least=0)
    if keep_first > context // 2:
        raise GenerationError(f"keep_first must be at most half the context ({context // 2}), got {keep_first}")
    first_seed = random_seed() if seed is None else seed
    samplers = [Sampler(temperature, top_k, top_p, first_seed + i, vocab_limit, min_p, repeat_penalty, repeat_last_n)
                for i in range(num_samples)]
    # The last new token is never fed back, so the cache needs one position fewer than the total.
    max_len = max(len(prompt), min(context, len(prompt) + max_new_tokens - 1))
    prefill = _KeptPrefill(Decoder(params, config, max_len, dtype), prompt)
    eos = {int(i) for i in np.atleast_1d(eos_ids if eos_ids is not None else ())}
    shift = ContextShift(context, min(keep_first, len(prompt))) if context_shift else None
    return _continuations(prefill, samplers, max_new_tokens, eos, shift)


def stream(params, config, prompt_ids, max_new_tokens, *settings, **named_settings):
    """(tokens, stats): an iterator over the new token ids, produced one at a time, and the
    GenerationStats it fills in. The settings are samples()'s."""
    return next(samples(params, config, prompt_ids, max_new_tokens, *settings, **named_settings))


def generate(params, config, prompt_ids, max_new_tokens, *settings, **named_settings):
    """The new token ids (a list) after prompt_ids; greedy unless a temperature is given. See samples()."""
    tokens, _ = stream(params, config, prompt_ids, max_new_tokens, *settings, **named_settings)
    return list(tokens)


def _checked_prompt(prompt_ids, config):
    prompt = [int(t) for t in prompt_ids]
    context = config.max_position_embeddings
    if not prompt:
        raise GenerationError("the prompt is empty: generation needs at least one token (e.g. BOS)")
    if len(prompt) > context:
        raise GenerationError(f"the prompt has {len(prompt)} tokens, more than the model's context of {context}")
    if min(prompt) < 0 or max(prompt) >= config.vocab_size:
        raise GenerationError(f"prompt token ids must lie in [0, {config.vocab_size})")
    return prompt


def _check_count(name, value, least):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
        kind = "a non-negative" if least == 0 else "a positive"
        raise GenerationError(f"{name} must be {kind} integer, got {value!r}")


class _KeptPrefill:
    """The prompt's logits, kept while the cache's first positions hold the prompt's keys and values."""

    def __init__(self, decoder, prompt):
        self.decoder, self.prompt, self.logits = decoder, prompt, None

    def run(self, stats):
        """The logits after the prompt: from the kept ones when the cache still holds it, else run."""
        if self.logits is None:
            self.decoder.rewind(0)
            self.logits = self.decoder.advance(self.prompt)
        else:
            self.decoder.rewind(len(self.prompt))
            stats.cached_tokens = len(self.prompt)
        return self.logits

    def forget(self):
        """The cache's first positions are about to hold something else."""
        self.logits = None


def _continuations(prefill, samplers, max_new_tokens, eos, shift):
    tokens = None
    for sampler in samplers:
        if tokens is not None:
            tokens.close()
        stats = GenerationStats(prompt_tokens=len(prefill.prompt),
                                seed=sampler.seed if sampler.temperature > 0 else None)
        tokens = _tokens(prefill, sampler, max_new_tokens, eos, shift, stats)
        yield tokens, stats


def _tokens(prefill, sampler, max_new_tokens, eos, shift, stats):
    if max_new_tokens == 0:
        stats.stop_reason = "length"
        return
    decoder, sequence = prefill.decoder, list(prefill.prompt)
    started = time.perf_counter()
    token = sampler(prefill.run(stats), sequence)
    stats.prefill_seconds = time.perf_counter() - started
    started = time.perf_counter()
    while True:
        sequence.append(token)
        stats.new_tokens += 1
        yield token
        if token in eos:
            stats.stop_reason = "eos"
        elif stats.new_tokens == max_new_tokens:
            stats.stop_reason = "length"
        elif decoder.cache.length < decoder.cache.max_len:
            token = sampler(decoder.advance([token]), sequence)
        elif shift is not None:
            token = sampler(_shifted(prefill, shift.window(sequence), stats), sequence)
        else:
            stats.stop_reason = "context"
        if stats.stop_reason:
            return
        stats.decode_seconds = time.perf_counter() - started - stats.shift_seconds


def _shifted(prefill, window, stats):
    """The logits after the window, run as a fresh prefill (positions from 0) over an emptied cache."""
    started = time.perf_counter()
    prefill.forget()
    prefill.decoder.rewind(0)
    logits = prefill.decoder.advance(window)
    stats.context_shifts += 1
    stats.shift_window = len(window)
    stats.shift_seconds += time.perf_counter() - started
    return logits


# ---- text -------------------------------------------------------------------------------------------
def stream_text(tokens, stats, text_decoder, stop=()):
    """The new tokens' text, piece by piece as text_decoder (a tokenizer's stream_decoder(), already fed
    the prompt when that is shown too) makes it, ending before the first of the stop strings found in
    it: the tokens are then closed and stats.stop_reason is "stop"."""
    shown = StopStrings(stop)
    for token in tokens:
        yield shown.push(text_decoder.push(token))
        if shown.stopped:
            tokens.close()
            break
    else:
        yield shown.push(text_decoder.flush())
        yield shown.flush()
    if shown.stopped:
        stats.stop_reason = "stop"


class StopStrings:
    """Text in, the part that may be shown out: everything before the first stop string. A piece's end
    that may begin a stop string is held back until the next piece says whether it does."""

    def __init__(self, strings):
        self.strings = list(strings)
        if "" in self.strings:
            raise GenerationError("a stop string must not be empty")
        self.held = ""
        self.stopped = False

    def push(self, piece):
        text = self.held + piece
        found = [at for at in (text.find(string) for string in self.strings) if at >= 0]
        if found:
            self.stopped, self.held = True, ""
            return text[:min(found)]
        keep = self._held_length(text)
        self.held = text[len(text) - keep:]
        return text[:len(text) - keep]

    def flush(self):
        """The text held back, at the end of the text (empty once stopped)."""
        text, self.held = self.held, ""
        return text

    def _held_length(self, text):
        """The length of text's longest end that is the start of a stop string (and not all of it)."""
        return max((n for string in self.strings for n in range(1, min(len(string), len(text) + 1))
                    if text.endswith(string[:n])), default=0)
