"""RMSNorm (Zhang & Sennrich, 2019), as in Llama: no mean subtraction, no bias.

Forward, over the last axis of size D:
    r = 1 / sqrt(mean(x²) + eps)          r: (..., 1)
    x̂ = x · r                             x̂: (..., D)
    y = x̂ ⊙ w                             w: (D,)   y: (..., D)
Backward (g = dy ⊙ w is the gradient with respect to x̂):
    dw = Σ_rows dy ⊙ x̂
    dx = r · (g − x̂ · mean(g ⊙ x̂))
    The second term comes from r depending on x: ∂r/∂x_j = −r³ x_j / D.
"""
from . import backend


def forward(x, weight, eps):
    xp = backend.array_module(x)
    r = 1.0 / xp.sqrt((x * x).mean(axis=-1, keepdims=True) + eps)
    x_hat = x * r
    return x_hat * weight, (x_hat, r, weight)


def backward(dy, cache):
    x_hat, r, weight = cache
    g = dy * weight
    dx = r * (g - x_hat * (g * x_hat).mean(axis=-1, keepdims=True))
    dweight = (dy * x_hat).reshape(-1, x_hat.shape[-1]).sum(axis=0)
    return dx, dweight
