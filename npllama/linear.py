"""Linear layer without bias, in the HF layout: the weight is (out, in).

Forward:   y = x Wᵀ                      x: (..., in)   W: (out, in)   y: (..., out)
Backward:  dx = dy W                     dx: (..., in)
           dW = Σ_rows dyᵀ x             dW: (out, in), summed over every leading (batch, time) index
The leading dimensions are flattened into one before each product: one large matrix product is
about twice as fast as a batch of small ones.
"""


def _rows(a):
    """(..., n) -> (N, n) view."""
    return a.reshape(-1, a.shape[-1])


def forward(x, weight):
    y = _rows(x) @ weight.T
    return y.reshape(*x.shape[:-1], weight.shape[0]), (x, weight)


def backward(dy, cache):
    x, weight = cache
    dx = (_rows(dy) @ weight).reshape(x.shape)
    return dx, weight_grad(dy, x)


def weight_grad(dy, x):
    """dW = dyᵀ x with the leading dimensions flattened into one sum: (N, out)ᵀ (N, in) -> (out, in)."""
    return _rows(dy).T @ _rows(x)
