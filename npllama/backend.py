"""The one place that chooses the array module: NumPy (CPU) or CuPy (CUDA).

Every op is written against an array module ``xp`` with the NumPy API. Ops never pick it themselves:
they call :func:`array_module` on their inputs, so an op runs wherever its arrays live. What decides
where arrays live is :func:`use` (the CLI's ``--device``) or the ``NPLLAMA_DEVICE`` environment variable
(``cpu``, ``cuda`` or ``auto``; default ``auto``: CUDA when CuPy finds a GPU, else NumPy).
No other file imports CuPy.

On the CPU it also says how many cores a training step may use (:func:`cpu_workers`) and runs BLAS
on one thread while each core computes its own shard of the batch (shards.py). ``NPLLAMA_WORKERS``
sets the number of shards (default: the cores this process may use; 1 turns sharding off).
"""
import contextlib
import ctypes
import functools
import os
import threading

import numpy as np

DEVICES = ("cpu", "cuda", "auto")


class BackendError(RuntimeError):
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


def _keep_freed_memory():
    """Ask glibc's malloc to keep freed memory for reuse instead of returning it to the OS.

    A training step allocates and frees the same activation-sized arrays every step. By default glibc
    maps arrays above a dynamic threshold afresh and trims the heap's free top, so each step pays a
    page fault for every 4 KiB it touches again: 20% of a small model's step time here. With
    allocations up to 32 MiB served from the heap and 64 MiB of free top kept, they are reused."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, Windows, musl): their allocators behave differently
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 32 << 20)
    libc.mallopt(m_trim_threshold, 64 << 20)


def use(device="auto"):
    """Choose the device for arrays created from now on; returns the chosen name, 'cpu' or 'cuda'.

    'cuda' raises BackendError with a one-line reason when CuPy or a GPU is missing;
    'auto' quietly falls back to the CPU.
    """
    global _active
    if device not in DEVICES:
        raise BackendError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    cupy, reason = (None, None) if device == "cpu" else _load_cupy()
    if cupy is None:
        if device == "cuda":
            raise BackendError(f"--device cuda was asked for, but {reason}")
        _keep_freed_memory()
        _active = ("cpu", np)
        return "cpu"
    _active = ("cuda", cupy)
    return "cuda"


def _ensure_chosen():
    if _active is None:
        use(os.environ.get("NPLLAMA_DEVICE", "auto").strip().lower() or "auto")
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


def array_module(*arrays):
    """The array module that owns these arrays: cupy if any is a CuPy array, else numpy."""
    for array in arrays:
        if type(array).__module__.startswith("cupy"):
            import cupy
            return cupy
    return np


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


# ---- CPU cores -----------------------------------------------------------------------------------
_BLAS_THREAD_FUNCTIONS = [  # (set, get) in the BLAS builds NumPy ships with or links against
    ("scipy_openblas_set_num_threads64_", "scipy_openblas_get_num_threads64_"),
    ("scipy_openblas_set_num_threads", "scipy_openblas_get_num_threads"),
    ("openblas_set_num_threads64_", "openblas_get_num_threads64_"),
    ("openblas_set_num_threads", "openblas_get_num_threads"),
    ("MKL_Set_Num_Threads", "MKL_Get_Max_Threads"),
]


@functools.lru_cache(maxsize=None)
def _blas_thread_control():
    """(set_num_threads, get_num_threads) of the BLAS NumPy loaded, or None where it cannot be found."""
    try:
        with open("/proc/self/maps") as maps:
            paths = sorted({line.split()[-1] for line in maps if "blas" in line.lower() or "mkl" in line.lower()})
    except OSError:  # not Linux
        return None
    for path in paths:
        try:
            library = ctypes.CDLL(path)
        except OSError:
            continue
        for set_name, get_name in _BLAS_THREAD_FUNCTIONS:
            if hasattr(library, set_name) and hasattr(library, get_name):
                return getattr(library, set_name), getattr(library, get_name)
    return None


def blas_threads_settable():
    """Whether single_threaded_blas() can work here (the BLAS NumPy loaded was found)."""
    return _blas_thread_control() is not None


def cpu_workers():
    """How many batch shards a training step runs at once on the CPU: NPLLAMA_WORKERS, else the
    usable cores; 1 on a GPU, or where BLAS's thread count cannot be set."""
    requested = os.environ.get("NPLLAMA_WORKERS", "").strip()
    if requested and (not requested.isdigit() or int(requested) < 1):
        raise BackendError(f"NPLLAMA_WORKERS must be a positive integer, got {requested!r}")
    if device() != "cpu" or not blas_threads_settable():
        return 1
    return int(requested) if requested else usable_cores()


def usable_cores(cpu_max="/sys/fs/cgroup/cpu.max"):
    """The cores this process may run on, capped by a container's CPU quota (cgroup v2 cpu.max)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        with open(cpu_max) as limits:
            quota, period = limits.read().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(quota) // int(period)))
    except (OSError, ValueError):  # no cgroup v2 limits here
        pass
    return cores


_single_threaded = {"blocks": 0, "threads before": None, "lock": threading.Lock()}


@contextlib.contextmanager
def single_threaded_blas():
    """BLAS on one thread inside the block (the caller runs one share of the work per core), as before
    once the last such block ends: blocks may overlap in several threads, and the setting is global."""
    set_threads, get_threads = _blas_thread_control()
    state = _single_threaded
    with state["lock"]:
        if state["blocks"] == 0:
            state["threads before"] = get_threads()
            set_threads(1)
        state["blocks"] += 1
    try:
        yield
    finally:
        with state["lock"]:
            state["blocks"] -= 1
            if state["blocks"] == 0:
                set_threads(state["threads before"])
