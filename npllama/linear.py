"""Linear layer without bias, in the HF layout: the weight is (out, in).

Forward:   y = x Wᵀ                      x: (..., in)   W: (out, in)   y: (..., out)
Backward:  dx = dy W                     dx: (..., in)
           dW = Σ_rows dyᵀ x             dW: (out, in), summed over every leading (batch, time) index
The leading dimensions are flattened into one before each product: one large matrix product is
about twice as fast as a batch of small ones.

The weight may also be a lora.Frozen: then no dW is computed (backward returns None in its place),
or, when it carries a LoRA adapter, the adapter's term is added and its gradient returned (lora.py).
For generation, the matrix may be a streamed.Streamed: kept as stored and widened block by block
(forward only).
"""
from . import lora, streamed


def _rows(a):
    """(..., n) -> (N, n) view."""
    return a.reshape(-1, a.shape[-1])


def forward(x, weight):
    matrix = lora.base(weight)
    if isinstance(matrix, streamed.Streamed):
        y = matrix.product(x)
    else:
        y = (_rows(x) @ matrix.T).reshape(*x.shape[:-1], matrix.shape[0])
    adapter = None
    if isinstance(weight, lora.Frozen) and weight.adapted:
        delta, adapter = lora.delta_forward(x, weight.a, weight.b, weight.scale)
        y += delta
    return y, (x, weight, adapter)


def backward(dy, cache):
    """Returns dx and the weight's gradient: dW, None (frozen) or lora.AdapterGrad (adapted)."""
    x, weight, adapter = cache
    dx = (_rows(dy) @ lora.base(weight)).reshape(x.shape)
    if not isinstance(weight, lora.Frozen):
        return dx, weight_grad(dy, x)
    if adapter is None:
        return dx, None
    dx_adapter, da, db = lora.delta_backward(dy, adapter)
    dx += dx_adapter
    return dx, lora.AdapterGrad(da, db)


def weight_grad(dy, x):
    """dW = dyᵀ x with the leading dimensions flattened into one sum: (N, out)ᵀ (N, in) -> (out, in)."""
    return _rows(dy).T @ _rows(x)
