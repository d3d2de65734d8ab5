"""Rotary position embedding (Su et al., 2021) in the HF "rotate half" convention.

Each head vector of size hd is split into halves x = [x₁, x₂] (each hd/2); feature i of the first
half is paired with feature i of the second and the pair is rotated by the angle θᵢ·p at position p:

Tables:    θᵢ = rope_theta^(−2i/hd),  i = 0 … hd/2 − 1   (then adjusted by rope_scaling, below)
           cos[p, i] = cos(p θᵢ),   sin[p, i] = sin(p θᵢ)          cos, sin: (T, hd/2)
Forward:   y₁ = x₁ ⊙ cos − x₂ ⊙ sin                                x, y: (..., T, hd)
           y₂ = x₂ ⊙ cos + x₁ ⊙ sin
Backward:  a rotation's inverse is its transpose, the rotation by −θ:
           dx₁ = dy₁ ⊙ cos + dy₂ ⊙ sin
           dx₂ = dy₂ ⊙ cos − dy₁ ⊙ sin

Meta's checkpoints pair interleaved features (2i, 2i+1) instead; importers permute q/k rows so that
this one convention holds everywhere.

rope_scaling (HF config.json):
  {"rope_type": "linear", "factor": f}   θᵢ / f (positions stretched f times)
  {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
   "original_max_position_embeddings"}   Llama 3.1: long wavelengths divided by f, short ones kept,
                                          the band between interpolated smoothly.
"""
import math

import numpy as np

from . import backend


def inverse_frequencies(head_dim, theta, scaling=None):
    """θᵢ for i = 0 … head_dim/2 − 1, as float64 NumPy (host) values."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        return _llama3_scaled(inv_freq, scaling)
    return inv_freq


def _llama3_scaled(inv_freq, scaling):
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    wavelength = 2 * math.pi / inv_freq
    smooth = (old_context / wavelength - low) / (high - low)  # 0 at the long end of the band, 1 at the short
    interpolated = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = np.where(wavelength > old_context / low, inv_freq / factor, inv_freq)
    in_band = (wavelength >= old_context / high) & (wavelength <= old_context / low)
    return np.where(in_band, interpolated, scaled)


def tables(config, positions, dtype, xp):
    """cos, sin: (T, head_dim/2) for these integer positions, computed in float64, cast to dtype."""
    inv_freq = inverse_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
    angles = np.asarray(backend.to_host(positions), dtype=np.float64)[:, None] * inv_freq[None, :]
    return xp.asarray(np.cos(angles), dtype=dtype), xp.asarray(np.sin(angles), dtype=dtype)


def forward(x, cos, sin):
    xp = backend.array_module(x)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    y = xp.concatenate((x1 * cos - x2 * sin, x2 * cos + x1 * sin), axis=-1)
    return y, (cos, sin)


def backward(dy, cache):
    """Returns dx (RoPE has no parameters)."""
    cos, sin = cache
    return forward(dy, cos, -sin)[0]
