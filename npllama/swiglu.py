"""The SwiGLU feed-forward network (Shazeer, 2020) of Llama's blocks.

Forward:   g = x W_gateᵀ,  u = x W_upᵀ                     x: (B, T, D)   g, u: (B, T, F)
           σ = sigmoid(g),  a = silu(g) = g ⊙ σ
           h = a ⊙ u                                        h: (B, T, F)
           y = h W_downᵀ                                    y: (B, T, D)
Backward:  dh = dy W_down,    dW_down = Σ dyᵀ h
           du = dh ⊙ a
           dg = dh ⊙ u ⊙ silu'(g),   silu'(g) = σ ⊙ (1 + g ⊙ (1 − σ))
           dx = dg W_gate + du W_up,   dW_gate = Σ dgᵀ x,   dW_up = Σ duᵀ x
"""
from . import backend, linear


def sigmoid(x):
    """σ(x) = 1 / (1 + e^−x), written as ½ + ½ tanh(x/2): the same function, without overflow."""
    xp = backend.array_module(x)
    return 0.5 + 0.5 * xp.tanh(0.5 * x)


def forward(x, w_gate, w_up, w_down):
    g = x @ w_gate.T
    u = x @ w_up.T
    sig = sigmoid(g)
    h = g * sig * u
    y = h @ w_down.T
    return y, (x, g, u, sig, h, w_gate, w_up, w_down)


def backward(dy, cache):
    """Returns dx, dW_gate, dW_up, dW_down."""
    x, g, u, sig, h, w_gate, w_up, w_down = cache
    dh, dw_down = linear.backward(dy, (h, w_down))
    du = dh * g * sig
    dg = dh * u * sig * (1 + g * (1 - sig))
    dx_gate, dw_gate = linear.backward(dg, (x, w_gate))
    dx_up, dw_up = linear.backward(du, (x, w_up))
    return dx_gate + dx_up, dw_gate, dw_up, dw_down
