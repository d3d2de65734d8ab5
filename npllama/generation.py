"""Text generation: the model run over a KV cache, and the sampler (sampling.py) kept apart from it.

Decoding one sequence:
    prefill   logits = Model(prompt)            the whole prompt in one batched forward; every layer's
                                                keys and values go into the KV cache
    step      token  = sample(logits)           sampling.py
              logits = Model(token | cache)     one position: its q, k, v against the cached k, v
Both are model.run_stack, the stack that training runs, given the cache. The cache makes each step cost
O(one position) instead of re-running the whole sequence; the logits are the same as a full forward's
(tests/test_generation.py checks it).

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

import numpy as np

from . import backend, dtypes, model
from .runtime.streamed import Streamed
from .sampling import GenerationError, Sampler  # noqa: F401 (GenerationError is this module's error too)


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
    cached_tokens: int = 0  # of the prompt's, those a kept KV cache already held (chat): not run again
    new_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    stop_reason: str = ""  # "length", "eos" or "context"

    def summary(self):
        """One line: tokens and speeds."""
        steps = self.new_tokens - 1  # the first new token comes from the prefill's logits
        cached = f" ({self.cached_tokens} cached)" if self.cached_tokens else ""
        return (f"prompt {self.prompt_tokens} tokens{cached}, {self.new_tokens} new ({self.stop_reason}); "
                f"prefill {_rate(self.prompt_tokens - self.cached_tokens, self.prefill_seconds)}, "
                f"decode {_rate(steps, self.decode_seconds)}")


def _rate(tokens, seconds):
    if tokens <= 0 or seconds <= 0:
        return "n/a"
    rate = tokens / seconds
    return f"{rate:,.1f} tok/s" if rate >= 1 else f"{rate:.3g} tok/s"


def stream(params, config, prompt_ids, max_new_tokens, temperature=0.0, top_k=None, top_p=None,
           seed=None, eos_ids=(), dtype=None, vocab_limit=None):
    """(tokens, stats): an iterator over the new token ids, produced one at a time, and the
    GenerationStats it fills in. Stops after max_new_tokens, after any of eos_ids (an id or ids;
    included), or when the model's context is full. Ids from vocab_limit on (embedding rows past the
    tokenizer's last id) are never sampled. Arguments are checked here, before the first token."""
    prompt = [int(t) for t in prompt_ids]
    context = config.max_position_embeddings
    if not prompt:
        raise GenerationError("the prompt is empty: generation needs at least one token (e.g. BOS)")
    if len(prompt) > context:
        raise GenerationError(f"the prompt has {len(prompt)} tokens, more than the model's context of {context}")
    if min(prompt) < 0 or max(prompt) >= config.vocab_size:
        raise GenerationError(f"prompt token ids must lie in [0, {config.vocab_size})")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
        raise GenerationError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    sampler = Sampler(temperature, top_k, top_p, seed, vocab_limit)
    stats = GenerationStats(prompt_tokens=len(prompt))
    # The last new token is never fed back, so the cache needs one position fewer than the total.
    max_len = max(len(prompt), min(context, len(prompt) + max_new_tokens - 1))
    decoder = Decoder(params, config, max_len, dtype)
    stops = {int(i) for i in np.atleast_1d(eos_ids if eos_ids is not None else ())}
    return _tokens(decoder, sampler, prompt, max_new_tokens, stops, context, stats), stats


def _tokens(decoder, sampler, prompt, max_new_tokens, stops, context, stats):
    if max_new_tokens == 0:
        stats.stop_reason = "length"
        return
    started = time.perf_counter()
    logits = decoder.advance(prompt)
    token = sampler(logits)
    stats.prefill_seconds = time.perf_counter() - started
    started = time.perf_counter()
    while True:
        stats.new_tokens += 1
        yield token
        if token in stops:
            stats.stop_reason = "eos"
        elif stats.new_tokens == max_new_tokens:
            stats.stop_reason = "length"
        elif decoder.cache.length == context:
            stats.stop_reason = "context"
        else:
            token = sampler(decoder.advance([token]))
            stats.decode_seconds = time.perf_counter() - started
            continue
        return


def generate(params, config, prompt_ids, max_new_tokens, temperature=0.0, top_k=None, top_p=None,
             seed=None, eos_ids=(), dtype=None, vocab_limit=None):
    """The new token ids (a list) after prompt_ids; greedy when temperature == 0. See stream()."""
    tokens, _ = stream(params, config, prompt_ids, max_new_tokens, temperature, top_k, top_p, seed,
                       eos_ids, dtype, vocab_limit)
    return list(tokens)
