"""Text generation: the model run over a KV cache, and a sampler kept apart from it.

Decoding one sequence:
    prefill   logits = Model(prompt)            the whole prompt in one batched forward; every layer's
                                                keys and values go into the KV cache
    step      token  = sample(logits)           greedy (argmax) at temperature 0, else drawn from
                                                softmax(logits / temperature), cut to the top-k tokens
                                                and to the smallest set whose probability ≥ top-p
              logits = Model(token | cache)     one position: its q, k, v against the cached k, v
The cache makes each step cost O(one position) instead of re-running the whole sequence; the logits
are the same as a full forward's (tests/test_generation.py checks it).

Weights are read in the dtype they are stored in and computed in `dtype` (float32 on the CPU: NumPy
has no fast float16 matrix product and no bfloat16). When the computed copies fit in half the free
memory they are made once. Otherwise (Llama-2-7B in float16 on a 24 GB CPU machine) each layer's
weights are taken when it runs: the CPU multiplies by them as stored, widening a block of rows at a time
(streamed.py), so memory holds the memory-mapped file and at most one layer that importing rebuilds
(weights.LazyTensors); a GPU copies each layer's weights over.
"""
import dataclasses
import time

import numpy as np

from . import attention, backend, dtypes, linear, lora, rmsnorm, rope, streamed, swiglu
from .model import BLOCK_PARAMS, EMBEDDING, FINAL_NORM, block_param_name, head_weight


class GenerationError(ValueError):
    """Arguments generation cannot run with (message is one line, fit for the user)."""


# ---- the sampler ------------------------------------------------------------------------------------
class Sampler:
    """Picks the next token from logits: argmax when temperature == 0, else a seeded draw."""

    def __init__(self, temperature=0.0, top_k=None, top_p=None, seed=None):
        if not temperature >= 0:
            raise GenerationError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and (not isinstance(top_k, (int, np.integer)) or top_k < 1):
            raise GenerationError(f"top-k must be a positive integer, got {top_k}")
        if top_p is not None and not 0 < top_p <= 1:
            raise GenerationError(f"top-p must lie in (0, 1], got {top_p}")
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.rng = np.random.default_rng(seed)

    def __call__(self, logits):
        logits = np.asarray(backend.to_host(logits), dtype=np.float64)
        if self.temperature == 0:
            return int(np.argmax(logits))
        probs = self.probabilities(logits)
        return int(min(np.searchsorted(np.cumsum(probs), self.rng.random()), probs.size - 1))

    def probabilities(self, logits):
        """p = softmax(logits / temperature) over the kept tokens (top-k, then top-p), 0 elsewhere."""
        z = logits / self.temperature
        if self.top_k is not None and self.top_k < z.size:
            z[z < np.partition(z, -self.top_k)[-self.top_k]] = -np.inf
        probs = np.exp(z - z.max())
        probs /= probs.sum()
        if self.top_p is not None and self.top_p < 1:
            order = np.argsort(-probs, kind="stable")
            mass_before = np.cumsum(probs[order]) - probs[order]
            probs[order[mass_before >= self.top_p]] = 0  # the most likely token always stays
            probs /= probs.sum()
        return probs


# ---- the model over a KV cache ----------------------------------------------------------------------
class Decoder:
    """One sequence's forward passes over a KV cache of max_len positions.

    advance(tokens) runs the next tokens (the prompt, then one at a time) and returns the logits (V,)
    that predict the token after the last of them."""

    def __init__(self, params, config, max_len, dtype=None):
        self.params, self.config = params, config
        self.dtype = dtypes.resolve(dtype) if dtype is not None else _default_dtype(lora.base(params[EMBEDDING]))
        if self.dtype == dtypes.BFLOAT16:
            raise GenerationError("NumPy and CuPy cannot compute in bf16; compute in fp32 (bf16 weights are widened)")
        xp = backend.xp()
        self.rotation = rope.tables(config, np.arange(max_len), self.dtype, xp)
        self.cache = attention.KVCache(config.num_hidden_layers, 1, config.num_key_value_heads, max_len,
                                       config.head_dim, self.dtype, xp)
        computed_bytes = config.num_parameters() * self.dtype.itemsize
        # Resident: computed copies made once. Otherwise each layer's weights are fetched when it runs
        # (a lazily imported tensor is built then, and dropped after): on the CPU they are multiplied by
        # as stored (streamed), on a GPU copied over.
        self.resident = computed_bytes <= backend.free_memory() // 2
        self.streamed = not self.resident and xp is np
        self._layers = [self._prepare_layer(i) for i in range(config.num_hidden_layers)] if self.resident else None
        self._head = self._prepare_head() if self.resident else None

    def _compute(self, weight, matrix=False):
        """A weight on the device in the compute dtype; a frozen one (lora.py) keeps its adapter.
        A matrix is kept as stored when streamed (streamed.py)."""
        def computed(array):
            return None if array is None else backend.to_device(dtypes.compute_array(array, self.dtype))

        def multiplied_by(array):
            return streamed.Streamed.of(array, self.dtype) if matrix and self.streamed else computed(array)
        if isinstance(weight, lora.Frozen):
            return lora.Frozen(multiplied_by(weight.weight), computed(weight.a), computed(weight.b), weight.scale)
        return multiplied_by(weight)

    def _prepare_layer(self, layer):
        """A layer's weights in the compute dtype, q, k and v fused into one (attention.py)."""
        weights = {}
        for short in BLOCK_PARAMS:
            weight = self.params[block_param_name(layer, short)]
            weights[short] = self._compute(weight, matrix=len(weight.shape) == 2)  # not the norms
        qkv = [weights.pop(short) for short in ("q_proj", "k_proj", "v_proj")]
        weights["qkv_adapters"] = attention.qkv_adapters(*qkv, self.config.head_dim)
        weights["qkv"] = lora.base(attention.fused_qkv_weight(*qkv, self.config.head_dim))
        return weights

    def _prepare_head(self):
        return (self._compute(self.params[FINAL_NORM]),
                self._compute(head_weight(self.params, self.config), matrix=True))

    def advance(self, tokens):
        start, end = self.cache.length, self.cache.length + len(tokens)
        if end > self.cache.max_len:
            raise GenerationError(f"{end} positions do not fit the KV cache of {self.cache.max_len}")
        eps = self.config.rms_norm_eps
        x = self._compute(lora.base(self.params[EMBEDDING])[np.asarray(tokens)])[None]  # (1, T, D)
        for layer in range(self.config.num_hidden_layers):
            weights = self._layers[layer] if self.resident else self._prepare_layer(layer)
            x = _block_step(x, weights, eps, self.rotation[start:end], self.cache, layer)
        self.cache.length = end
        final_norm, head = self._head if self.resident else self._prepare_head()
        h, _ = rmsnorm.forward(x[0, -1], final_norm, eps)  # only the last position predicts
        return linear.forward(h, head)[0]


def _default_dtype(weight):
    """float64 stays float64 (exact checks); everything else computes in float32 on the CPU and in
    float16 on a GPU when stored as float16."""
    if weight.dtype == np.float64:
        return np.dtype(np.float64)
    if backend.device() == "cuda" and weight.dtype == np.float16:
        return np.dtype(np.float16)
    return np.dtype(np.float32)


def _block_step(x, weights, eps, rotation, cache, layer):
    """model.block_forward for the next positions over the KV cache, keeping nothing for backward."""
    normed, _ = rmsnorm.forward(x, weights["input_layernorm"], eps)
    h = x + attention.forward_cached(normed, weights["qkv"], weights["qkv_adapters"], weights["o_proj"], rotation,
                                     cache, layer)
    normed, _ = rmsnorm.forward(h, weights["post_attention_layernorm"], eps)
    mlp_out, _ = swiglu.forward(normed, weights["gate_proj"], weights["up_proj"], weights["down_proj"])
    return h + mlp_out


# ---- generation -------------------------------------------------------------------------------------
@dataclasses.dataclass
class GenerationStats:
    prompt_tokens: int
    new_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    stop_reason: str = ""  # "length", "eos" or "context"

    def summary(self):
        """One line: tokens and speeds."""
        steps = self.new_tokens - 1  # the first new token comes from the prefill's logits
        return (f"prompt {self.prompt_tokens} tokens, {self.new_tokens} new ({self.stop_reason}); "
                f"prefill {_rate(self.prompt_tokens, self.prefill_seconds)}, "
                f"decode {_rate(steps, self.decode_seconds)}")


def _rate(tokens, seconds):
    if tokens <= 0 or seconds <= 0:
        return "n/a"
    rate = tokens / seconds
    return f"{rate:,.1f} tok/s" if rate >= 1 else f"{rate:.3g} tok/s"


def stream(params, config, prompt_ids, max_new_tokens, temperature=0.0, top_k=None, top_p=None,
           seed=None, eos_id=None, dtype=None):
    """(tokens, stats): an iterator over the new token ids, produced one at a time, and the
    GenerationStats it fills in. Stops after max_new_tokens, after eos_id (included), or when the
    model's context is full. Arguments are checked here, before the first token."""
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
    sampler = Sampler(temperature, top_k, top_p, seed)
    stats = GenerationStats(prompt_tokens=len(prompt))
    # The last new token is never fed back, so the cache needs one position fewer than the total.
    max_len = max(len(prompt), min(context, len(prompt) + max_new_tokens - 1))
    decoder = Decoder(params, config, max_len, dtype)
    return _tokens(decoder, sampler, prompt, max_new_tokens, eos_id, context, stats), stats


def _tokens(decoder, sampler, prompt, max_new_tokens, eos_id, context, stats):
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
        if token == eos_id:
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
             seed=None, eos_id=None, dtype=None):
    """The new token ids (a list) after prompt_ids; greedy when temperature == 0. See stream()."""
    tokens, _ = stream(params, config, prompt_ids, max_new_tokens, temperature, top_k, top_p, seed,
                       eos_id, dtype)
    return list(tokens)
