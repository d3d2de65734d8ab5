"""The one place that chooses the array module: NumPy (CPU) or CuPy (CUDA).

Every op is written against an array module ``xp`` with the NumPy API. Ops never pick it themselves:
they call :func:`array_module` on their inputs, so an op runs wherever its arrays live. What decides
where arrays live is :func:`use` (the CLI's ``--device``) or the ``NPLLAMA_DEVICE`` environment variable
(``cpu``, ``cuda`` or ``auto``; default ``auto``: CUDA when CuPy finds a GPU, else NumPy).
No other file imports CuPy.

How the CPU is used (cores, BLAS threads, the allocator) is runtime/cpu.py's concern, not this file's.
"""
import os

import numpy as np

from .errors import UserError

DEVICES = ("cpu", "cuda", "auto")


class BackendError(UserError, RuntimeError):
    """The requested device cannot be used (message is one line, fit for the user)."""


_active = None  # (device name, array module) once chosen


def _load_cupy():
    """Return the cupy module if it is installed and sees a GPU, else (None, reason)."""
    try:
        import cupy
    except ImportError:
        return None, "CuPy is not installed (pip install cupy-cuda12x, matching your CUDA)"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as error:  # CUDA driver/runtime missing: CuPy raises its own error types
        return None, f"CuPy cannot reach a GPU ({type(error).__name__}: {str(error).splitlines()[0]})"
    if count == 0:
        return None, "CuPy found no GPU"
    return cupy, None


def use(device="auto"):
    """Choose the device for arrays created from now on; returns the chosen name, 'cpu' or 'cuda'.

    'cuda' raises BackendError with a one-line reason when CuPy or a GPU is missing;
    'auto' is NPLLAMA_DEVICE's choice when it is set, else the GPU if there is one, quietly the CPU if not.
    """
    global _active
    if device == "auto":
        device = _environment_device()
    if device not in DEVICES:
        raise BackendError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    cupy, reason = (None, None) if device == "cpu" else _load_cupy()
    if cupy is None:
        if device == "cuda":
            raise BackendError(f"--device cuda was asked for, but {reason}")
        _active = ("cpu", np)
        return "cpu"
    _active = ("cuda", cupy)
    return "cuda"


def _environment_device():
    value = os.environ.get("NPLLAMA_DEVICE", "").strip().lower() or "auto"
    if value not in DEVICES:
        raise BackendError(f"NPLLAMA_DEVICE={value!r} is not a device; set it to one of {', '.join(DEVICES)}")
    return value


def _ensure_chosen():
    if _active is None:
        use("auto")
    return _active


def device():
    """The active device name: 'cpu' or 'cuda'."""
    return _ensure_chosen()[0]


def xp():
    """The active array module (numpy or cupy)."""
    return _ensure_chosen()[1]


def describe():
    """A short human-readable description of the active device."""
    name, module = _ensure_chosen()
    if name == "cpu":
        return f"cpu (NumPy {np.__version__})"
    props = module.cuda.runtime.getDeviceProperties(module.cuda.Device().id)
    return f"cuda ({props['name'].decode()}, CuPy {module.__version__})"


def is_array(value):
    """Whether value is a NumPy or CuPy array (rather than, say, a weight that multiplies itself)."""
    return isinstance(value, np.ndarray) or type(value).__module__.startswith("cupy")


def array_module(*arrays):
    """The array module that owns these arrays: cupy if any is a CuPy array, else numpy."""
    for array in arrays:
        if type(array).__module__.startswith("cupy"):
            import cupy
            return cupy
    return np


def on_device_of(array, index):
    """A host index array where array's module wants it (NumPy's own for anything not CuPy's)."""
    module = array_module(array)
    return index if module is np else module.asarray(index)


def to_device(array, dtype=None):
    """Copy a host array (or array-like) onto the active device, optionally casting."""
    return xp().asarray(array, dtype=dtype)


def to_host(array):
    """A NumPy array with the same values (no copy when already on the host)."""
    if type(array).__module__.startswith("cupy"):
        return array.get()
    return np.asarray(array)


def free_memory():
    """Bytes the active device can still allocate: free GPU memory, or the host's MemAvailable."""
    name, module = _ensure_chosen()
    if name == "cuda":
        return module.cuda.Device().mem_info[0]
    try:
        with open("/proc/meminfo") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):  # not Linux: assume the physical memory is free
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def scatter_add(target, indices, values):
    """target[indices[i]] += values[i] for every i, accumulating repeated indices (in place)."""
    module = array_module(target)
    if module is np:  # np.add.at is slow: sort, then sum each run of equal indices in one reduction
        order = np.argsort(indices, kind="stable")
        sorted_indices = indices[order]
        run_starts = np.flatnonzero(np.r_[True, sorted_indices[1:] != sorted_indices[:-1]])
        target[sorted_indices[run_starts]] += np.add.reduceat(values[order], run_starts, axis=0)
    else:
        import cupyx
        cupyx.scatter_add(target, indices, values)
    return target
