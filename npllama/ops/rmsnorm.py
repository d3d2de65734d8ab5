"""RMSNorm (Zhang & Sennrich, 2019), as in Llama: no mean subtraction, no bias.

Forward, over the last axis of size D:
    r = 1 / sqrt(mean(x²) + eps)          r: (..., 1)
    x̂ = x · r                             x̂: (..., D)
    y = x̂ ⊙ w                             w: (D,)   y: (..., D)
Backward (g = dy ⊙ w is the gradient with respect to x̂):
    dw = Σ_rows dy ⊙ x̂
    dx = r · (g − x̂ · mean(g ⊙ x̂))
    The second term comes from r depending on x: ∂r/∂x_j = −r³ x_j / D.
Row sums of products are einsum contractions: one pass, no temporary array.
"""
from .. import backend


def forward(x, weight, eps):
    xp = backend.array_module(x)
    wide = x.astype(xp.float32) if x.dtype == xp.float16 else x  # as HF: x² overflows fp16 past 256
    mean_square = xp.einsum("...d,...d->...", wide, wide)[..., None] / x.shape[-1]
    r = 1 / xp.sqrt(mean_square + eps)
    x_hat = (wide * r).astype(x.dtype, copy=False)
    return x_hat * weight, (x_hat, r, weight)


def backward(dy, cache):
    x_hat, r, weight = cache
    xp = backend.array_module(dy)
    g = dy * weight
    dx = x_hat * (xp.einsum("...d,...d->...", g, x_hat)[..., None] / x_hat.shape[-1])
    xp.subtract(g, dx, out=dx)
    dx *= r
    dweight = xp.einsum("nd,nd->d", dy.reshape(-1, dy.shape[-1]), x_hat.reshape(-1, x_hat.shape[-1]))
    return dx, dweight
