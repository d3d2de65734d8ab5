"""The linear layer, and the product seam: every product x Wᵀ with a weight W goes through here.

Forward:   y = x Wᵀ                      x: (..., in)   W: (out, in)   y: (..., out)
Backward:  dx = dy W                     dx: (..., in)
           dW = Σ_rows dyᵀ x             dW: (out, in), summed over every leading (batch, time) index
The leading dimensions are flattened into one before each product: one large matrix product is
about twice as fast as a batch of small ones.

The seam. A weight is a plain array (NumPy or CuPy; it is trained: backward returns dW) or an object
that performs its own product:
    shape                                 (out, in)
    forward(x) -> (y, cache)              y = x Wᵀ
    backward(dy, cache) -> (dx, grad)     grad: the gradient of what the weight trains, None if nothing
                                          (a dict {name: array} for parts of its own, e.g. LoRA's A, B)
Frozen weights and LoRA adapters (adapters.py), weights multiplied as stored (runtime/streamed.py)
and, next, quantized blocks and GPU kernels are such objects. This file is the only one that tells
an array from an object in a product: the ops see a weight. (The model asks backend.is_array too,
for what is not a product: whether a parameter is trained, and a frozen one's values.)

Fused weights. Fused multiplies by several weights at once, each with its rows reordered and scaled:
    y = [x W₁'ᵀ, x W₂'ᵀ, …],   Wᵢ' = sᵢ · Wᵢ[oᵢ]            oᵢ: a permutation of Wᵢ's rows
(attention's q, k and v: model.py). When every part is an array they are stacked into one matrix and
multiplied once. Otherwise each part multiplies for itself and its output columns are reordered and
scaled instead, since x (s·W[o])ᵀ = s·(x Wᵀ)[..., o]. Backward returns each part's gradient in that
part's own layout: for an array, dWᵢ = sᵢ · dWᵢ'[oᵢ⁻¹] (dWᵢ' being its rows of the stacked dW).
"""
from typing import NamedTuple

import numpy as np

from .. import backend


class Cache(NamedTuple):
    x: object       # the input (an array weight's dW needs it)
    weight: object
    inner: object   # a weight object's own cache; None for an array


def rows(a):
    """(..., n) -> (N, n) view: the leading dimensions flattened into one."""
    return a.reshape(-1, a.shape[-1])


def forward(x, weight):
    if backend.is_array(weight):
        return (rows(x) @ weight.T).reshape(*x.shape[:-1], weight.shape[0]), Cache(x, weight, None)
    y, inner = weight.forward(x)
    return y, Cache(x, weight, inner)


def backward(dy, cache):
    """Returns dx and the weight's gradient (dW for an array; whatever a weight object returns)."""
    x, weight, inner = cache
    if backend.is_array(weight):
        return input_grad(dy, weight), weight_grad(dy, x)
    return weight.backward(dy, inner)


def product(x, weight):
    """y = x Wᵀ, keeping nothing for backward (inference)."""
    return forward(x, weight)[0]


def input_grad(dy, weight):
    """dx = dy W: (..., out) -> (..., in); a weight object gives its own (e.g. a frozen quantized base's)."""
    if not backend.is_array(weight):
        return weight.input_grad(dy)
    return (rows(dy) @ weight).reshape(*dy.shape[:-1], weight.shape[1])


def converted(weight, convert, matrix):
    """The weight as it is computed with: convert(array, matrix) for an array; an object converts itself
    (keeping its role: frozen, adapted, quantized)."""
    return convert(weight, matrix) if backend.is_array(weight) else weight.converted(convert, matrix)


def weight_grad(dy, x):
    """dW = dyᵀ x with the leading dimensions flattened into one sum: (N, out)ᵀ (N, in) -> (out, in)."""
    return rows(dy).T @ rows(x)


class Part(NamedTuple):
    """One weight of a Fused weight: its rows reordered by `order` (None: as they are), then scaled."""
    weight: object
    order: object = None
    scale: float = 1.0


class Fused:
    """Several weights multiplied as one (module docstring). Backward's gradient is a list, a part each."""

    def __init__(self, parts):
        self.parts = [Part(*part) for part in parts]
        self.sizes = [part.weight.shape[0] for part in self.parts]
        self.inverses = [None if part.order is None else _inverse(part.order, size)
                         for part, size in zip(self.parts, self.sizes)]
        self.shape = (sum(self.sizes), self.parts[0].weight.shape[1])
        arrays = all(backend.is_array(part.weight) for part in self.parts)
        self.stacked = backend.array_module(self.parts[0].weight).concatenate(
            [_arranged_rows(*part) for part in self.parts]) if arrays else None

    def forward(self, x):
        if self.stacked is not None:
            return forward(x, self.stacked)
        outputs = [forward(x, part.weight) for part in self.parts]
        columns = [_arranged_columns(y, part.order, part.scale) for (y, _), part in zip(outputs, self.parts)]
        return backend.array_module(x).concatenate(columns, axis=-1), [cache for _, cache in outputs]

    def backward(self, dy, cache):
        if self.stacked is not None:
            dx, d_stacked = backward(dy, cache)
            ends = np.cumsum(self.sizes)
            return dx, [_arranged_rows(d_stacked[end - size:end], inverse, part.scale)
                        for end, size, inverse, part in zip(ends, self.sizes, self.inverses, self.parts)]
        dx, grads = None, []
        pieces = backend.array_module(dy).split(dy, np.cumsum(self.sizes)[:-1].tolist(), axis=-1)
        for piece, inverse, part, part_cache in zip(pieces, self.inverses, self.parts, cache):
            part_dx, grad = backward(_arranged_columns(piece, inverse, part.scale), part_cache)
            if dx is None:
                dx = part_dx
            else:
                dx += part_dx
            grads.append(grad)
        return dx, grads


def _inverse(order, size):
    order = np.asarray(backend.to_host(order))
    if order.shape != (size,) or not np.array_equal(np.sort(order), np.arange(size)):
        raise ValueError(f"a fused part's row order must be a permutation of its {size} rows")
    return np.argsort(order)


def _arranged_rows(weight, order, scale):
    """s · W[o], as a new array (a gradient's way back: s · dW'[o⁻¹])."""
    if order is not None:
        weight = weight[backend.on_device_of(weight, order)]  # a gather makes a new array
    elif scale == 1.0:
        return weight.copy()  # a part's gradient must not be a view of the stacked one
    return weight * scale if scale != 1.0 else weight


def _arranged_columns(y, order, scale):
    """s · y[..., o]: the output of W[o]·s from the output of W (or, with o⁻¹, a gradient's way back)."""
    arranged = y if order is None else y[..., backend.on_device_of(y, order)]
    return arranged * scale if scale != 1.0 else arranged
