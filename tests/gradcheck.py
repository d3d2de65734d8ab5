"""Central finite differences, for checking hand-written backward passes in float64."""
import numpy as np

from npllama import backend

STEP = 1e-5  # float64: truncation error ~STEP² and round-off ~1e-16/STEP both stay far below 1e-6


def numerical_grad(f, x, indices=None, step=STEP):
    """∂f/∂x[i] ≈ (f(x + h eᵢ) − f(x − h eᵢ)) / 2h at every index (or the given flat indices).

    f takes no arguments and reads x, which is perturbed in place and restored."""
    flat = x.reshape(-1)  # a view: writing to it perturbs x
    indices = range(flat.size) if indices is None else indices
    grad = []
    for i in indices:
        original = float(flat[i])
        flat[i] = original + step
        plus = float(f())
        flat[i] = original - step
        minus = float(f())
        flat[i] = original
        grad.append((plus - minus) / (2 * step))
    return np.array(grad)


def relative_error(analytic, numeric):
    """‖a − n‖ / max(‖a‖, ‖n‖), and 0 when both are 0."""
    analytic, numeric = backend.to_host(analytic).ravel(), backend.to_host(numeric).ravel()
    scale = max(np.linalg.norm(analytic), np.linalg.norm(numeric))
    return 0.0 if scale == 0 else float(np.linalg.norm(analytic - numeric) / scale)
