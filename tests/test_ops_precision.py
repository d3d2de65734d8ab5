"""Ops keep their dtype and stay finite in half precision, as HF's do."""
import numpy as np

from npllama import backend
from npllama.ops import rmsnorm


def test_rmsnorm_float16_large_activations(xp):
    """x² overflows float16 above 256; the mean square is taken in float32, as HF does."""
    x = xp.ones((2, 4096), dtype=xp.float16)
    x[0, 0] = 300.0
    weight = xp.full(4096, 0.5, dtype=xp.float16)
    y, _ = rmsnorm.forward(x, weight, 1e-5)
    reference, _ = rmsnorm.forward(x.astype(xp.float32), weight.astype(xp.float32), 1e-5)
    assert y.dtype == np.float16
    np.testing.assert_allclose(backend.to_host(y).astype(np.float32), backend.to_host(reference), rtol=2e-3)
