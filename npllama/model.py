"""The Llama model: token embedding, a stack of pre-norm blocks, a final RMSNorm and the LM head.

One block (pre-norm residual, as in Llama), for the T tokens at positions p₀ … p₀+T−1:
    h   = x + Attention(RMSNorm(x; w_in))
    out = h + SwiGLU(RMSNorm(h; w_post))
    Attention(x):  q, k, v = x Wqᵀ, x Wkᵀ, x Wvᵀ (one fused product)     split into heads of size hd
                   q, k    = RoPE(q), RoPE(k) at their positions;  q scaled by 1/√hd (folded into Wq)
                   k, v    = the cache's keys and values of positions < p₀, then these (decoding)
                   O       = CausalAttention(q, k, v)  (ops/attention.py)
                   y       = O Woᵀ, the heads concatenated
Its backward follows the same lines upwards; each residual sum passes its gradient to both branches:
    dh = dout + RMSNorm_backward(SwiGLU_backward(dout))
    dx = dh   + RMSNorm_backward(Attention_backward(dh))
The stack: x₀ = Embedding(tokens); x_{l+1} = Block_l(x_l); logits = RMSNorm(x_L; w_norm) W_headᵀ.
With tied embeddings W_head is the embedding matrix, and its gradient is the sum of both uses'.

One stack serves training, evaluation, prefill and decoding (Meta's forward(tokens, start_pos)): the
tokens start at position 0, or after the positions a KVCache already holds. What it computes with is a
Weights: the parameters as the blocks use them (the compute dtype; q, k and v fused into one weight
with q and k rows in RoPE's paired order, rope.py), prepared from the params dict when a block runs,
or once and kept (generation.py's choice).

Parameters are a flat dict with HF transformers' names and (out, in) layouts (config.py); grads use
the same keys. A parameter is trained when it is an array; a weight object (adapters.py: Frozen,
Adapted) answers for itself in products, and its values are used elsewhere.
"""
from typing import NamedTuple

import numpy as np

from . import backend, dtypes
from .config import EMBEDDING, FINAL_NORM, LM_HEAD, block_param_name, parameter_shapes
from .ops import attention, embedding, linear, lm_head, rmsnorm, rope, swiglu


INIT_SCHEMES = ("hf", "gpt2")  # init_params' choices; the first is the default (bench/init_recipe.py measured it)


def init_params(config, seed=0, dtype="float32", scheme=INIT_SCHEMES[0]):
    """Fresh parameters on the active device: norms at 1, every other weight ~ N(0, 0.02²) (scheme
    "hf": transformers' LlamaPreTrainedModel init, the default, which trained the nanoGPT Shakespeare
    recipe to a lower validation loss over 3 seeds: bench/init_recipe.py); with "gpt2" the two
    projections that write into the residual stream (o_proj, down_proj) are scaled by 1/√(2·layers),
    so the residual's variance does not grow with depth (GPT-2's init). Same seed, same values."""
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"init scheme must be one of {', '.join(INIT_SCHEMES)}, got {scheme!r}")
    rng = np.random.default_rng(seed)
    residual_std = 0.02 / np.sqrt(2 * config.num_hidden_layers) if scheme == "gpt2" else 0.02
    params = {}
    for name, shape in parameter_shapes(config).items():
        if name.endswith("layernorm.weight") or name == FINAL_NORM:
            initial = np.ones(shape, dtype=np.float32)
        else:
            std = residual_std if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
            initial = rng.standard_normal(shape, dtype=np.float32) * np.float32(std)
        params[name] = backend.to_device(initial, dtype=dtype)
    return params


def trainable(params, dtype="fp32"):
    """Writable copies of params on the active device, in the master dtype (fp16/bf16 widened); a
    weight object (quantized blocks) is kept as it is: it can be a frozen base, not be trained."""
    master = np.dtype(dtypes.resolve(dtype))
    return {name: backend.to_device(np.array(dtypes.compute_array(np.asarray(backend.to_host(value)), master)))
            if backend.is_array(value) else value for name, value in params.items()}


def head_name(config):
    return EMBEDDING if config.tie_word_embeddings else LM_HEAD


def head_weight(params, config):
    return params[head_name(config)]


# ---- what the stack computes with -----------------------------------------------------------------
def values(weight):
    """What a parameter holds, for uses other than a product: the array, or a weight object's values."""
    return weight if backend.is_array(weight) else weight.values


def stored_dtype(params):
    """The embedding's stored dtype, read without making it where params can tell (io's LazyTensors)."""
    describe = getattr(params, "describe", None)
    return describe(EMBEDDING)[0] if describe is not None else values(params[EMBEDDING]).dtype


def default_dtype(params):
    """float64 parameters compute in float64 (exact checks); all others (fp32, fp16, bf16) in float32."""
    return np.dtype(np.float64) if stored_dtype(params) == np.float64 else np.dtype(np.float32)


def in_dtype(dtype):
    """A Weights converter: every array in the compute dtype, on its own device (bf16 widened)."""
    return lambda array, matrix: dtypes.compute_array(array, dtype)


def fused_qkv(wq, wk, wv, head_dim):
    """[s·Wq; Wk; Wv] as one weight (ops/linear.Fused), s = 1/√hd: the three projections in one product.
    q and k rows are put in RoPE's paired order (rope.py), which leaves every q·k unchanged, and q is
    scaled here rather than its scores later (RoPE is linear: RoPE(x (s·Wq)ᵀ) = s·RoPE(x Wqᵀ))."""
    return linear.Fused([(wq, rope.pair_order(wq.shape[0], head_dim), head_dim ** -0.5),
                         (wk, rope.pair_order(wk.shape[0], head_dim)), (wv,)])


class Block(NamedTuple):
    """One block's weights as it computes with them (norms: arrays; the rest: weights, ops/linear.py)."""
    input_norm: object
    qkv: linear.Fused   # [s·Wq (paired rows); Wk (paired rows); Wv]
    o: object
    post_norm: object
    gate: object
    up: object
    down: object


class Weights:
    """The parameters as the stack uses them (module docstring).

    convert(array, matrix) makes each stored array into what is computed with: an array of the compute
    dtype on the compute device, or for a matrix (matrix=True) any weight (generation streams them).
    keep: prepare each block once and keep it (decoding); otherwise prepare it at every use.
    xp: the compute device's array module (default: the one holding the embedding)."""

    def __init__(self, params, config, dtype=None, convert=None, keep=False, xp=None):
        self.params, self.config = params, config
        self.dtype = np.dtype(dtype) if dtype is not None else default_dtype(params)
        self.convert = convert or in_dtype(self.dtype)
        # the compute device's module: the parameters' (tensors made when read are host arrays)
        self.xp = xp or (np if hasattr(params, "describe") else backend.array_module(values(params[EMBEDDING])))
        self.head_dim = config.head_dim
        self._kept = {} if keep else None
        self._rotation = None

    def _computed(self, weight, matrix=True):
        return linear.converted(weight, self.convert, matrix)

    def _prepared(self, key, make):
        if self._kept is None:
            return make()
        if key not in self._kept:
            self._kept[key] = make()
        return self._kept[key]

    @property
    def embedding(self):
        """The embedding table as stored; kept when blocks are kept (decoding): a table made when read
        (a GGUF's blocks laid out anew, llama2.c's int8 widened) is then made once."""
        return self._prepared("embedding", lambda: values(self.params[EMBEDDING]))

    def embed(self, tokens):
        """x: (B, T, D) for tokens (B, T), and the embedding's cache."""
        table = self.embedding
        rows, cache = embedding.forward(table, backend.array_module(table).asarray(tokens))
        return self.xp.asarray(self.convert(rows, False)), cache

    def block(self, layer):
        return self._prepared(layer, lambda: self._block(layer))

    def _block(self, layer):
        def weight(short, matrix=True):
            return self._computed(self.params[block_param_name(layer, short)], matrix)
        qkv = fused_qkv(weight("q_proj"), weight("k_proj"), weight("v_proj"), self.head_dim)
        return Block(values(weight("input_layernorm", False)), qkv, weight("o_proj"),
                     values(weight("post_attention_layernorm", False)), weight("gate_proj"), weight("up_proj"),
                     weight("down_proj"))

    @property
    def final_norm(self):
        return self._prepared("norm", lambda: values(self._computed(self.params[FINAL_NORM], False)))

    @property
    def head(self):
        return self._prepared("head", lambda: self._computed(head_weight(self.params, self.config)))

    def rotation(self, start, end):
        """RoPE's e^{jpθ} for positions start … end − 1: (end − start, hd/2). The table is kept, and
        grown to twice its length when a later position is asked for (decoding asks for one more a step)."""
        if self._rotation is None or len(self._rotation) < end:
            size = max(end, 2 * len(self._rotation)) if self._rotation is not None else end
            self._rotation = rope.tables(self.config, np.arange(size), self.dtype, self.xp)
        return self._rotation[start:end]

    @property
    def kept(self):
        """The blocks (and norm, head) prepared and kept so far, by layer; None when nothing is kept."""
        return self._kept

    def trained(self, name):
        """Whether the parameter gets a gradient (an array; a weight object answers in its own backward)."""
        return backend.is_array(self.params[name])


class KVCache:
    """Keys and values of the positions seen so far, for every layer, preallocated for max_len positions.
    keys[l], values[l]: (B, K, max_len, hd); the first `length` positions are filled."""

    def __init__(self, config, batch, max_len, dtype, xp):
        shape = (config.num_hidden_layers, batch, config.num_key_value_heads, max_len, config.head_dim)
        self.keys, self.values = xp.zeros(shape, dtype=dtype), xp.zeros(shape, dtype=dtype)
        self.length = 0
        self.max_len = max_len

    def append(self, layer, k, v):
        """Store k, v: (B, K, T, hd) of the next T positions; returns views of all length + T."""
        end = self.length + k.shape[2]
        self.keys[layer, :, :, self.length:end] = k
        self.values[layer, :, :, self.length:end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]


# ---- attention: projections and RoPE around the core ---------------------------------------------
class AttentionCache(NamedTuple):
    qkv: object          # the fused projection's cache
    core: object         # ops/attention.py's cache
    o: object            # the output projection's cache
    rotation: object
    n_heads: int


def _split_heads(x, head_dim):
    """(B, T, n·hd) -> (B, n, T, hd)."""
    batch, time, width = x.shape
    return x.reshape(batch, time, width // head_dim, head_dim).transpose(0, 2, 1, 3)


def _merge_heads(x):
    """(B, n, T, hd) -> (B, T, n·hd)."""
    batch, heads, time, head_dim = x.shape
    return x.transpose(0, 2, 1, 3).reshape(batch, time, heads * head_dim)


def attention_forward(x, qkv, o, rotation, n_heads, kv_cache=None, layer=None):
    """x: (B, T, D) -> y: (B, T, D); rotation: (T, hd/2) for the tokens' positions (module docstring)."""
    xp = backend.array_module(x)
    batch, time, _ = x.shape
    head_dim = 2 * rotation.shape[-1]
    projected, qkv_cache = linear.forward(x, qkv)
    projected = projected.reshape(batch, time, -1, head_dim)                     # (B, T, H + 2K, hd)
    n_kv_heads = (projected.shape[2] - n_heads) // 2
    qk, _ = rope.forward(projected[:, :, :n_heads + n_kv_heads], rotation[:, None])  # positions on axis 1
    q = qk[:, :, :n_heads].transpose(0, 2, 1, 3)                                  # (B, H, T, hd)
    # k and v are copied out so the cache does not keep the whole projection alive.
    k = xp.ascontiguousarray(qk[:, :, n_heads:].transpose(0, 2, 1, 3))             # (B, K, T, hd)
    v = xp.ascontiguousarray(projected[:, :, n_heads + n_kv_heads:].transpose(0, 2, 1, 3))
    if kv_cache is not None:
        k, v = kv_cache.append(layer, k, v)                                       # (B, K, S, hd)
    out, core = attention.forward(q, k, v)
    y, o_cache = linear.forward(_merge_heads(out), o)
    return y, AttentionCache(qkv_cache, core, o_cache, rotation, n_heads)


def attention_backward(dy, cache):
    """Returns dx and the gradients of the fused q, k, v weight (a list of three) and of Wo."""
    xp = backend.array_module(dy)
    batch, time, _ = dy.shape
    head_dim = 2 * cache.rotation.shape[-1]
    n_heads = cache.n_heads
    d_out, d_o = linear.backward(dy, cache.o)
    dq, dk, dv = attention.backward(_split_heads(d_out, head_dim), cache.core)
    n_kv_heads = dk.shape[1]
    # Gather dq, dk, dv into the fused projection's layout, undo RoPE, then one product back.
    d_qkv = xp.empty((batch, time, n_heads + 2 * n_kv_heads, head_dim), dtype=dy.dtype)
    d_qkv[:, :, :n_heads] = dq.transpose(0, 2, 1, 3)
    d_qkv[:, :, n_heads:n_heads + n_kv_heads] = dk.transpose(0, 2, 1, 3)
    d_qkv[:, :, :n_heads + n_kv_heads] = rope.backward(d_qkv[:, :, :n_heads + n_kv_heads], cache.rotation[:, None])
    d_qkv[:, :, n_heads + n_kv_heads:] = dv.transpose(0, 2, 1, 3)
    dx, d_qkv_weight = linear.backward(d_qkv.reshape(batch, time, -1), cache.qkv)
    return dx, d_qkv_weight, d_o


# ---- one block ----------------------------------------------------------------------------------
def block_forward(x, w, eps, rotation, n_heads, kv_cache=None, layer=None):
    """x: (B, T, D); w: a Block. Returns out: (B, T, D), cache."""
    normed, norm_in = rmsnorm.forward(x, w.input_norm, eps)
    attended, attn = attention_forward(normed, w.qkv, w.o, rotation, n_heads, kv_cache, layer)
    h = x + attended
    normed, norm_post = rmsnorm.forward(h, w.post_norm, eps)
    mlp_out, mlp = swiglu.forward(normed, w.gate, w.up, w.down)
    return h + mlp_out, (norm_in, attn, norm_post, mlp)


def block_backward(dout, cache):
    """Returns dx: (B, T, D) and the block's grads by short name (BLOCK_PARAMS)."""
    norm_in, attn, norm_post, mlp = cache
    grads = {}
    d_normed, grads["gate_proj"], grads["up_proj"], grads["down_proj"] = swiglu.backward(dout, mlp)
    d_h, grads["post_attention_layernorm"] = rmsnorm.backward(d_normed, norm_post)
    d_h += dout
    d_normed, (grads["q_proj"], grads["k_proj"], grads["v_proj"]), grads["o_proj"] = attention_backward(d_h, attn)
    dx, grads["input_layernorm"] = rmsnorm.backward(d_normed, norm_in)
    dx += d_h
    return dx, grads


# ---- the stack ----------------------------------------------------------------------------------
class StackCache(NamedTuple):
    """What stack_backward needs. Per layer l, `blocks` keeps either the block's whole cache (stored
    activations: per token about 6D + 3Dₖᵥ + 4F + H·T values) or, with recompute, only its input
    x_l: (B, T, D), from which block_cache makes the cache again when the backward reaches the layer."""
    weights: Weights
    embedding: object
    blocks: list       # block caches, or (recompute) block inputs x_l
    norm: object
    rotation: object   # RoPE's table for the tokens' positions: (T, hd/2)
    recompute: bool

    def block_cache(self, layer):
        """The layer's block cache: kept, or made again by block_forward on the kept input x_l (the
        same operations on the same values: the same cache, bit for bit)."""
        if not self.recompute:
            return self.blocks[layer]
        config = self.weights.config
        return block_forward(self.blocks[layer], self.weights.block(layer), config.rms_norm_eps, self.rotation,
                             config.num_attention_heads)[1]


def check_tokens(tokens, config):
    tokens = np.asarray(backend.to_host(tokens))
    if tokens.ndim != 2 or tokens.shape[1] == 0:
        raise ValueError(f"tokens must be a (batch, time) array with time >= 1, got shape {tokens.shape}")
    if tokens.dtype.kind not in "iu":
        raise ValueError(f"tokens must be integers, got {tokens.dtype}")
    if int(tokens.min()) < 0 or int(tokens.max()) >= config.vocab_size:
        raise ValueError(f"token ids must lie in [0, {config.vocab_size}), "
                         f"got [{int(tokens.min())}, {int(tokens.max())}]")
    return tokens


def run_stack(weights, tokens, kv_cache=None, keep_caches=False, recompute=False):
    """The final normed hidden states h: (B, T, D) of checked tokens (B, T) at positions start … start+T−1,
    start being the positions kv_cache holds (which it then also holds for these), else 0; and the
    caches for stack_backward (None unless kept). With recompute, the caches keep only each block's
    input x_l (L·B·T·D values) instead of its whole cache (StackCache)."""
    config = weights.config
    start = kv_cache.length if kv_cache is not None else 0
    end = start + tokens.shape[1]
    if kv_cache is not None and end > kv_cache.max_len:
        raise ValueError(f"{end} positions do not fit the KV cache of {kv_cache.max_len}")
    rotation = weights.rotation(start, end)
    x, embed_cache = weights.embed(tokens)
    kept = []
    for layer in range(config.num_hidden_layers):
        block_input = x
        x, cache = block_forward(block_input, weights.block(layer), config.rms_norm_eps, rotation,
                                 config.num_attention_heads, kv_cache, layer)
        if keep_caches:
            kept.append(block_input if recompute else cache)
        del cache  # unless kept, freed before the next block makes its own
    if kv_cache is not None:
        kv_cache.length = end
    h, norm_cache = rmsnorm.forward(x, weights.final_norm, config.rms_norm_eps)
    return h, (StackCache(weights, embed_cache, kept, norm_cache, rotation, recompute) if keep_caches else None)


def stack_backward(dh, caches, extra=None):
    """The backward pass of run_stack: dh (B, T, D) -> grads by parameter name, for trained parameters
    only. extra: gradients of parameters used after the stack (the LM head), added in. A weight that
    trains parts of its own (adapters.py) returns a dict; its entries are named under the weight's name
    less ".weight" (an adapter's A: ...q_proj.lora_A.weight). Caches kept for recompute have each
    block's forward run again on its input just before its backward, that one block's cache then freed."""
    weights = caches.weights
    grads = {}
    dx, grads[FINAL_NORM] = rmsnorm.backward(dh, caches.norm)
    for layer in reversed(range(weights.config.num_hidden_layers)):
        dx, block_grads = block_backward(dx, caches.block_cache(layer))  # a recomputed cache is freed here
        grads.update({block_param_name(layer, short): g for short, g in block_grads.items()})
    if weights.trained(EMBEDDING):
        grads[EMBEDDING] = embedding.backward(dx, caches.embedding)
    for name, grad in (extra or {}).items():
        if grad is not None:
            grads[name] = grad if grads.get(name) is None else grads[name] + grad
    return _named(grads, weights)


def _named(grads, weights):
    """grads by parameter name -> the trained tensors' gradients, in the params' order."""
    named = {}
    for name in weights.params:
        grad = grads.get(name)
        if isinstance(grad, dict):
            named.update({f"{name[:-len('.weight')]}.{part}": value for part, value in grad.items()})
        elif grad is not None and weights.trained(name):
            named[name] = grad
    return named


# ---- the public functions ----------------------------------------------------------------------------
def hidden_states(params, config, tokens):
    """tokens: (B, T) ints -> the final normed hidden states h: (B, T, D)."""
    return run_stack(Weights(params, config), check_tokens(tokens, config))[0]


def hidden_states_for_training(params, config, tokens, recompute=False):
    """tokens: (B, T) -> h: (B, T, D), and the caches that stack_backward needs to turn a gradient dh
    of any loss of h into the parameters' gradients (recompute: loss_and_grads)."""
    return run_stack(Weights(params, config), check_tokens(tokens, config), keep_caches=True, recompute=recompute)


def forward(params, config, tokens, kv_cache=None):
    """tokens: (B, T) ints -> logits: (B, T, V) in the compute dtype (float32, or float64 for float64
    params), on the parameters' device. With a KVCache, the tokens follow the positions it holds."""
    weights = Weights(params, config)
    return logits(weights, run_stack(weights, check_tokens(tokens, config), kv_cache)[0])


def logits(weights, h):
    """z = h W_headᵀ: (..., D) -> (..., V)."""
    return linear.product(h, weights.head)


def check_targets(targets, tokens, config):
    targets = np.asarray(backend.to_host(targets))
    if targets.shape != tokens.shape:
        raise ValueError(f"targets shape {targets.shape} differs from tokens shape {tokens.shape}")
    if targets.dtype.kind not in "iu":
        raise ValueError(f"targets must be integers, got {targets.dtype}")
    valid = targets != lm_head.IGNORE_INDEX
    if bool(((targets < 0) | (targets >= config.vocab_size))[valid].any()):
        raise ValueError(f"targets must lie in [0, {config.vocab_size}) or be {lm_head.IGNORE_INDEX}")
    if not bool(valid.any()):
        raise ValueError(f"every target is the ignore index ({lm_head.IGNORE_INDEX}): the loss is undefined")
    return targets


def loss(params, config, tokens, targets):
    """Mean cross-entropy of predicting targets (B, T) (−100 = ignored) from tokens (B, T), without
    gradients (evaluation). Returns a float."""
    tokens = check_tokens(tokens, config)
    targets = check_targets(targets, tokens, config)
    weights = Weights(params, config)
    h = run_stack(weights, tokens)[0]
    return float(lm_head.forward(h, weights.head, weights.xp.asarray(targets))[0])


def loss_and_grads(params, config, tokens, targets, scale=1.0, recompute=False):
    """Mean cross-entropy of predicting targets (B, T) (−100 = ignored) from tokens (B, T), and the
    gradient of scale × that loss for every trained parameter: (loss: float, grads: dict like params).
    Weight objects (adapters.py) get no gradient, their adapters' gradients come under the adapters'
    names (adapters.adapter_names). One process; the same inputs give the same numbers.

    recompute (activation recomputation, gradient checkpointing): the forward keeps only each block's
    input x_l, and the backward runs each block's forward again to make its cache. Activations kept
    per token: L·D + one block's cache (≈ 6D + 3Dₖᵥ + 4F + H·T), instead of L·(that); the cost is
    one more forward of the blocks, about 1/3 more compute. The same gradients, bit for bit on the CPU."""
    tokens = check_tokens(tokens, config)
    targets = check_targets(targets, tokens, config)
    weights = Weights(params, config)
    h, caches = run_stack(weights, tokens, keep_caches=True, recompute=recompute)
    loss_value, head_cache = lm_head.forward(h, weights.head, weights.xp.asarray(targets))
    dh, d_head = lm_head.backward(scale, head_cache)
    return float(loss_value), stack_backward(dh, caches, {head_name(config): d_head})
