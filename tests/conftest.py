"""Every test runs on the device NPLLAMA_DEVICE names (cpu by default here; cuda on a GPU machine)."""
import os

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("NPLLAMA_DEVICE", "cpu")

from npllama import backend  # noqa: E402  (after the default device is set)


@pytest.fixture(autouse=True)
def restore_backend():
    """Commands call backend.use(--device): every test leaves the device as it found it."""
    saved = backend._active
    yield
    backend._active = saved


@pytest.fixture
def xp():
    """The array module of the device under test; skips (with the reason) when it is unavailable."""
    try:
        return backend.xp()
    except backend.BackendError as error:
        pytest.skip(str(error))


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def array_bytes(value, seen):
    """Bytes of the arrays in a nest of caches (NamedTuples, tuples, lists) not in `seen` (by base)."""
    if isinstance(value, np.ndarray):
        while isinstance(value.base, np.ndarray):
            value = value.base
        if id(value) in seen:
            return 0
        seen.add(id(value))
        return value.nbytes
    if isinstance(value, (tuple, list)):
        return sum(array_bytes(item, seen) for item in value)
    return 0
