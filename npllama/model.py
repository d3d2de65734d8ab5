"""The Llama model: token embedding, a stack of pre-norm blocks, a final RMSNorm and the LM head.

One block (pre-norm residual, as in Llama):
    h   = x + Attention(RMSNorm(x; w_in))
    out = h + SwiGLU(RMSNorm(h; w_post))
Its backward follows the same lines upwards; each residual sum passes its gradient to both branches:
    dh = dout + RMSNorm_backward(SwiGLU_backward(dout))
    dx = dh   + RMSNorm_backward(Attention_backward(dh))
The stack: x₀ = Embedding(tokens); x_{l+1} = Block_l(x_l); logits = RMSNorm(x_L; w_norm) W_headᵀ.
With tied embeddings W_head is the embedding matrix, and its gradient is the sum of both uses'.

Parameters are a flat dict with HF transformers' names and (out, in) layouts; grads use the same keys.
"""
import numpy as np

from . import attention, backend, embedding, linear, lm_head, lora, rmsnorm, rope, shards, swiglu

EMBEDDING = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"
# A block's parameters: short name -> name under "model.layers.{i}."
BLOCK_PARAMS = {
    "input_layernorm": "input_layernorm.weight",
    "q_proj": "self_attn.q_proj.weight",
    "k_proj": "self_attn.k_proj.weight",
    "v_proj": "self_attn.v_proj.weight",
    "o_proj": "self_attn.o_proj.weight",
    "post_attention_layernorm": "post_attention_layernorm.weight",
    "gate_proj": "mlp.gate_proj.weight",
    "up_proj": "mlp.up_proj.weight",
    "down_proj": "mlp.down_proj.weight",
}


def block_param_name(layer, short_name):
    return f"model.layers.{layer}.{BLOCK_PARAMS[short_name]}"


def parameter_shapes(config):
    """name -> shape of every parameter the config calls for, in HF order."""
    d, f, kv = config.hidden_size, config.intermediate_size, config.num_key_value_heads * config.head_dim
    block = {"input_layernorm": (d,), "q_proj": (d, d), "k_proj": (kv, d), "v_proj": (kv, d),
             "o_proj": (d, d), "post_attention_layernorm": (d,), "gate_proj": (f, d),
             "up_proj": (f, d), "down_proj": (d, f)}
    shapes = {EMBEDDING: (config.vocab_size, d)}
    for layer in range(config.num_hidden_layers):
        shapes.update({block_param_name(layer, short): shape for short, shape in block.items()})
    shapes[FINAL_NORM] = (d,)
    if not config.tie_word_embeddings:
        shapes[LM_HEAD] = (config.vocab_size, d)
    return shapes


def init_params(config, seed=0, dtype="float32"):
    """Fresh parameters on the active device: norms at 1, weights ~ N(0, 0.02²), and the two
    projections that write into the residual stream (o_proj, down_proj) scaled by 1/√(2·layers)
    so the residual's variance does not grow with depth (GPT-2's init). Same seed, same values."""
    rng = np.random.default_rng(seed)
    residual_std = 0.02 / np.sqrt(2 * config.num_hidden_layers)
    params = {}
    for name, shape in parameter_shapes(config).items():
        if name.endswith("layernorm.weight") or name == FINAL_NORM:
            values = np.ones(shape, dtype=np.float32)
        else:
            std = residual_std if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
            values = rng.standard_normal(shape, dtype=np.float32) * np.float32(std)
        params[name] = backend.to_device(values, dtype=dtype)
    return params


def head_weight(params, config):
    return params[EMBEDDING] if config.tie_word_embeddings else params[LM_HEAD]


# ---- one block ----------------------------------------------------------------------------------
def block_forward(x, weights, eps, rotation):
    """x: (B, T, D); weights: short name -> array (BLOCK_PARAMS). Returns out: (B, T, D), cache."""
    normed, norm_in = rmsnorm.forward(x, weights["input_layernorm"], eps)
    attended, attn = attention.forward(normed, weights["q_proj"], weights["k_proj"], weights["v_proj"],
                                       weights["o_proj"], rotation)
    h = x + attended
    normed, norm_post = rmsnorm.forward(h, weights["post_attention_layernorm"], eps)
    mlp_out, mlp = swiglu.forward(normed, weights["gate_proj"], weights["up_proj"], weights["down_proj"])
    return h + mlp_out, (norm_in, attn, norm_post, mlp)


def block_backward(dout, cache):
    """Returns dx: (B, T, D) and the block's grads by short name."""
    norm_in, attn, norm_post, mlp = cache
    grads = {}
    d_normed, grads["gate_proj"], grads["up_proj"], grads["down_proj"] = swiglu.backward(dout, mlp)
    d_h, grads["post_attention_layernorm"] = rmsnorm.backward(d_normed, norm_post)
    d_h += dout
    d_normed, grads["q_proj"], grads["k_proj"], grads["v_proj"], grads["o_proj"] = \
        attention.backward(d_h, attn)
    dx, grads["input_layernorm"] = rmsnorm.backward(d_normed, norm_in)
    dx += d_h
    return dx, grads


# ---- the stack ----------------------------------------------------------------------------------
def _check_tokens(tokens, config, xp):
    tokens = xp.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[1] == 0:
        raise ValueError(f"tokens must be a (batch, time) array with time >= 1, got shape {tokens.shape}")
    if tokens.dtype.kind not in "iu":
        raise ValueError(f"tokens must be integers, got {tokens.dtype}")
    if int(tokens.min()) < 0 or int(tokens.max()) >= config.vocab_size:
        raise ValueError(f"token ids must lie in [0, {config.vocab_size}), "
                         f"got [{int(tokens.min())}, {int(tokens.max())}]")
    return tokens


def hidden_states(params, config, tokens):
    """tokens: (B, T) ints -> the final normed hidden states h: (B, T, D)."""
    tokens = _check_tokens(tokens, config, backend.array_module(lora.base(params[EMBEDDING])))
    return _run_stack(params, config, tokens, keep_caches=False)[0]


def _run_stack(params, config, tokens, keep_caches):
    """h: (B, T, D) for checked tokens, and the caches for backward (None unless kept)."""
    weight = params[EMBEDDING]
    xp = backend.array_module(lora.base(weight))
    rotation = rope.tables(config, np.arange(tokens.shape[1]), lora.base(weight).dtype, xp)
    x, embed_cache = embedding.forward(weight, tokens)
    block_caches = []
    for layer in range(config.num_hidden_layers):
        weights = {short: params[block_param_name(layer, short)] for short in BLOCK_PARAMS}
        x, cache = block_forward(x, weights, config.rms_norm_eps, rotation)
        if keep_caches:
            block_caches.append(cache)
    h, norm_cache = rmsnorm.forward(x, params[FINAL_NORM], config.rms_norm_eps)
    return h, ((embed_cache, block_caches, norm_cache) if keep_caches else None)


def forward(params, config, tokens):
    """tokens: (B, T) ints -> logits: (B, T, V), on the parameters' device."""
    h = hidden_states(params, config, tokens)
    return linear.forward(h, head_weight(params, config))[0]


def _check_targets(targets, tokens, config, xp):
    targets = xp.asarray(targets)
    if targets.shape != tokens.shape:
        raise ValueError(f"targets shape {targets.shape} differs from tokens shape {tokens.shape}")
    if targets.dtype.kind not in "iu":
        raise ValueError(f"targets must be integers, got {targets.dtype}")
    valid = targets != lm_head.IGNORE_INDEX
    if bool(((targets < 0) | (targets >= config.vocab_size))[valid].any()):
        raise ValueError(f"targets must lie in [0, {config.vocab_size}) or be {lm_head.IGNORE_INDEX}")
    if not bool(valid.any()):
        raise ValueError(f"every target is the ignore index ({lm_head.IGNORE_INDEX}): the loss is undefined")
    return targets, valid


def loss(params, config, tokens, targets):
    """Mean cross-entropy of predicting targets (B, T) (−100 = ignored) from tokens (B, T), without
    gradients (evaluation). Returns a float."""
    xp = backend.array_module(lora.base(params[EMBEDDING]))
    tokens = _check_tokens(tokens, config, xp)
    targets, _ = _check_targets(targets, tokens, config, xp)
    h = _run_stack(params, config, tokens, keep_caches=False)[0]
    return float(lm_head.forward(h, head_weight(params, config), targets)[0])


def loss_and_grads(params, config, tokens, targets):
    """Mean cross-entropy of predicting targets (B, T) (−100 = ignored) from tokens (B, T),
    and its gradient for every parameter. Returns (loss: float, grads: dict like params).
    Parameters wrapped in lora.Frozen get no gradient; their adapters' gradients are returned under
    the adapters' names (lora.adapter_names).

    On the CPU the batch is split into one shard per core, computed at the same time (shards.py). The
    loss is a mean over valid targets, so each shard's loss and gradient count by its share of them."""
    xp = backend.array_module(lora.base(params[EMBEDDING]))
    tokens = _check_tokens(tokens, config, xp)
    targets, valid = _check_targets(targets, tokens, config, xp)

    frozen = any(isinstance(value, lora.Frozen) for value in params.values())
    workers = backend.cpu_workers() if xp is np and not frozen else 1  # the shard pool shares plain arrays
    split = np.array_split(np.arange(tokens.shape[0]), min(workers, tokens.shape[0]))
    row_groups = [rows for rows in split if valid[rows].any()]  # a shard with nothing to predict adds 0
    if len(row_groups) == 1:
        return shard_loss_and_grads(params, config, tokens, targets)
    shares = [float(valid[rows].sum() / valid.sum()) for rows in row_groups]
    losses, grads = shards.pool(workers - 1).run(
        params, config, [(tokens[rows], targets[rows], share) for rows, share in zip(row_groups, shares)],
        lambda shard: shard_loss_and_grads(params, config, *shard))
    return sum(share * loss for share, loss in zip(shares, losses, strict=True)), grads


def shard_loss_and_grads(params, config, tokens, targets, dloss=1.0):
    """The loss of one shard, on checked inputs, and the gradient of dloss × that loss: a shard
    holding this share of the batch's valid targets adds share × its gradient to the batch's."""
    h, caches = _run_stack(params, config, tokens, keep_caches=True)
    loss, head_cache = lm_head.forward(h, head_weight(params, config), targets)
    dh, d_head = lm_head.backward(dloss, head_cache)
    head = {LM_HEAD: d_head} if not config.tie_word_embeddings else {EMBEDDING: d_head}
    return float(loss), stack_backward(params, config, dh, caches, head)


def hidden_states_for_training(params, config, tokens):
    """tokens: (B, T) -> the final normed hidden states h: (B, T, D), and the caches that
    stack_backward needs to turn a gradient dh of any loss of h into the parameters' gradients."""
    tokens = _check_tokens(tokens, config, backend.array_module(lora.base(params[EMBEDDING])))
    return _run_stack(params, config, tokens, keep_caches=True)


def stack_backward(params, config, dh, caches, extra=None):
    """The backward pass of _run_stack: dh (B, T, D) -> grads by name (lora.named_grads: frozen weights
    have none). extra: gradients of parameters used after the stack (the LM head), added in."""
    embed_cache, block_caches, norm_cache = caches
    grads = {}
    dx, grads[FINAL_NORM] = rmsnorm.backward(dh, norm_cache)
    for layer in reversed(range(config.num_hidden_layers)):
        dx, block_grads = block_backward(dx, block_caches[layer])
        grads.update({block_param_name(layer, short): g for short, g in block_grads.items()})
    grads[EMBEDDING] = embedding.backward(dx, embed_cache)
    for name, grad in (extra or {}).items():
        if grad is not None:
            grads[name] = grad if grads.get(name) is None else grads[name] + grad
    return lora.named_grads({name: grads.get(name) for name in params})
