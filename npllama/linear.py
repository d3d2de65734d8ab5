"""Linear layer without bias, in the HF layout: the weight is (out, in).

Forward:   y = x Wᵀ                      x: (..., in)   W: (out, in)   y: (..., out)
Backward:  dx = dy W                     dx: (..., in)
           dW = Σ_rows dyᵀ x             dW: (out, in), summed over every leading (batch, time) index
"""


def forward(x, weight):
    y = x @ weight.T
    return y, (x, weight)


def backward(dy, cache):
    x, weight = cache
    dx = dy @ weight
    dweight = weight_grad(dy, x)
    return dx, dweight


def weight_grad(dy, x):
    """dW = dyᵀ x with the leading dimensions flattened into one sum: (N, out)ᵀ (N, in) -> (out, in)."""
    return dy.reshape(-1, dy.shape[-1]).T @ x.reshape(-1, x.shape[-1])
