"""The language-model head and the fused softmax cross-entropy loss.

Forward:   z = x Wᵀ                                   x: (B, T, D)   W: (V, D)   z: (B, T, V)
           p = softmax(z) over the vocabulary
           loss = (1/N) Σ_{valid (b,t)} −log p[b, t, y_bt]
           Targets equal to IGNORE_INDEX (−100, as in torch and HF) are not valid: they add nothing
           to the loss, and N counts the valid targets only.
Backward:  dz[b, t] = dloss · (p[b, t] − onehot(y_bt)) / N   on valid positions, 0 elsewhere
           dx = dz W,   dW = Σ dzᵀ x
Fusing softmax with the loss keeps the backward a subtraction: no (V × V) Jacobian, no log of a
rounded-off probability.
"""
from . import backend, linear

IGNORE_INDEX = -100


def forward(x, weight, targets):
    """targets: (B, T) ints in [0, V) or IGNORE_INDEX. Returns (loss: a scalar array, cache).

    One (N, V) buffer serves as logits, then exponentials, then probabilities (kept for backward)."""
    xp = backend.array_module(x)
    logits, head = linear.forward(x, weight)
    logits = logits.reshape(-1, weight.shape[0])                       # (N, V)
    targets = targets.reshape(-1)
    valid = targets != IGNORE_INDEX
    n_valid = int(valid.sum())
    if n_valid == 0:
        raise ValueError("every target is the ignore index (-100): the loss is undefined")
    logits -= logits.max(axis=-1, keepdims=True)                       # each row's largest logit is 0
    target_logits = logits[xp.arange(targets.shape[0]), xp.where(valid, targets, 0)]
    probs = xp.exp(logits, out=logits)
    sum_exp = probs.sum(axis=-1)
    loss = ((xp.log(sum_exp) - target_logits) * valid).sum() / n_valid
    probs /= sum_exp[:, None]
    return loss, (head, probs, targets, valid, n_valid)


def backward(dloss, cache):
    """Returns dx: (B, T, D), dW: (V, D) (None when W is frozen, lora.py)."""
    head, probs, targets, valid, n_valid = cache
    x = head[0]
    xp = backend.array_module(probs)
    scale = float(dloss) / n_valid  # a Python float keeps the dtype of probs
    dlogits = probs * scale
    dlogits[~valid] = 0
    rows = xp.flatnonzero(valid)
    dlogits[rows, targets[rows]] -= scale
    dx, dweight = linear.backward(dlogits.reshape(*x.shape[:-1], -1), head)
    return dx, dweight
