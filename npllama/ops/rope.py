"""Rotary position embedding (Su et al., 2021), computed as complex multiplication.

HF's convention (the one npllama's parameters follow) pairs feature i of a head vector with feature
i + hd/2 and rotates each pair by the angle θᵢ·p at position p:
    y_i        = x_i ⊙ cos(pθᵢ) − x_{i+hd/2} ⊙ sin(pθᵢ)
    y_{i+hd/2} = x_{i+hd/2} ⊙ cos(pθᵢ) + x_i ⊙ sin(pθᵢ),       θᵢ = rope_theta^(−2i/hd), i < hd/2
Read the pair as one complex number zᵢ = x_i + j·x_{i+hd/2} and this is a product:
Forward:   y = z ⊙ e^{jpθ}                                     z, y: (..., T, n, hd/2) complex
Backward:  a rotation's inverse is its transpose, the rotation by −θ:  dz = dy ⊙ e^{−jpθ}
To be read as one complex number the two features of a pair must sit side by side in memory (a
float array is then viewed as a complex one, no copy). `pair_order` reorders q and k projection rows
so they do ([x₀, x_{hd/2}, x₁, x_{1+hd/2}, …] per head): the model's fused q/k/v weight is made with it,
and maps the gradients back (ops/linear.Fused); attention only forms q·k, which is the same for any
order shared by q and k. Meta's checkpoints store this paired order; importers convert them to HF's
on import (`from_pairs`).

rope_scaling (HF config.json):
  {"rope_type": "linear", "factor": f}   θᵢ / f (positions stretched f times)
  {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
   "original_max_position_embeddings"}   Llama 3.1: long wavelengths divided by f, short ones kept,
                                          the band between interpolated smoothly.
"""
import functools
import math

import numpy as np

from .. import backend


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
    """e^{jpθ}: (T, head_dim/2) complex, for these integer positions, computed in float64.

    dtype is the real dtype the rotation will be applied to (float16 rotates in complex64)."""
    inv_freq = inverse_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
    angles = np.asarray(backend.to_host(positions), dtype=np.float64)[:, None] * inv_freq[None, :]
    return xp.asarray(np.exp(1j * angles), dtype=_complex_dtype(dtype))


def _complex_dtype(real_dtype):
    return np.complex128 if np.dtype(real_dtype) == np.float64 else np.complex64


@functools.lru_cache(maxsize=64)
def pair_order(rows, head_dim):
    """Row indices that put each head's rows i and i + hd/2 side by side: to_pairs(W) = W[pair_order]
    (read-only: the same array is returned for the same arguments)."""
    order = np.arange(rows).reshape(rows // head_dim, 2, head_dim // 2).transpose(0, 2, 1).reshape(-1)
    order.setflags(write=False)
    return order


def half_order(rows, head_dim):
    """The inverse reordering, paired order -> HF order: from_pairs(W) = W[half_order]."""
    return np.arange(rows).reshape(rows // head_dim, head_dim // 2, 2).transpose(0, 2, 1).reshape(-1)


def to_pairs(weight, head_dim):
    """Projection rows (n·hd, ...) in HF order -> paired order."""
    return weight[backend.on_device_of(weight, pair_order(weight.shape[0], head_dim))]


def from_pairs(weight, head_dim):
    """Inverse of to_pairs (what importers of Meta-ordered q/k rows apply)."""
    return weight[backend.on_device_of(weight, half_order(weight.shape[0], head_dim))]


def _rotate(x, rotation):
    """x: (..., hd) real in paired order (last axis contiguous); rotation broadcasts against (..., hd/2)."""
    real = np.float64 if x.dtype == np.float64 else np.float32  # no complex32: float16 rotates in float32
    z = x.astype(real, copy=False).view(_complex_dtype(real))
    return (z * rotation).view(real).astype(x.dtype, copy=False)


def forward(x, rotation):
    """y = x rotated by e^{jpθ}. x: (..., hd) in paired order; rotation broadcasts against (..., hd/2)."""
    return _rotate(x, rotation), rotation


def backward(dy, cache):
    """dx = dy rotated by e^{−jpθ}. Returns dx alone: RoPE has no parameters."""
    return _rotate(dy, cache.conj())
