"""The SwiGLU feed-forward network (Shazeer, 2020) of Llama's blocks.

Forward:   g = x W_gateᵀ,  u = x W_upᵀ                     x: (B, T, D)   g, u: (B, T, F)
           σ = sigmoid(g),  a = silu(g) = g ⊙ σ
           h = a ⊙ u                                        h: (B, T, F)
           y = h W_downᵀ                                    y: (B, T, D)
Backward:  dh = dy W_down,    dW_down = Σ dyᵀ h
           du = dh ⊙ a
           dg = dh ⊙ u ⊙ silu'(g),   silu'(g) = σ ⊙ (1 + g ⊙ (1 − σ)) = σ + a ⊙ (1 − σ)
           dx = dg W_gate + du W_up,   dW_gate = Σ dgᵀ x,   dW_up = Σ duᵀ x
The (B, T, F) arrays are the largest in a block, so the elementwise steps update buffers in place.
"""
from .. import backend
from . import linear


def sigmoid(x):
    """σ(x) = 1 / (1 + e^−x), written as ½ + ½ tanh(x/2): the same function, without overflow."""
    xp = backend.array_module(x)
    s = x * 0.5
    xp.tanh(s, out=s)
    s *= 0.5
    s += 0.5
    return s


def forward(x, w_gate, w_up, w_down):
    g, gate = linear.forward(x, w_gate)
    u, up = linear.forward(x, w_up)
    sig = sigmoid(g)
    a = g
    a *= sig                   # a = silu(g); g itself is not needed again
    h = a * u
    y, down = linear.forward(h, w_down)
    return y, (u, sig, a, gate, up, down)


def backward(dy, cache):
    """Returns dx, dW_gate, dW_up, dW_down (each what its weight returns: linear.py)."""
    u, sig, a, gate, up, down = cache
    dh, dw_down = linear.backward(dy, down)
    du = dh * a
    dg = 1 - sig
    dg *= a
    dg += sig                  # silu'(g)
    dg *= u
    dg *= dh
    dx_gate, dw_gate = linear.backward(dg, gate)
    dx_up, dw_up = linear.backward(du, up)
    dx_gate += dx_up
    return dx_gate, dw_gate, dw_up, dw_down
