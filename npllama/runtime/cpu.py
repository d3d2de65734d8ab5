"""The CPU: how many cores this process may use, BLAS's thread count, and the allocator.

NumPy runs elementwise work on one core and BLAS on as many threads as it likes. Work split into one
share per core (a training batch's shards, parallel.py; a streamed weight's blocks, streamed.py) runs
each share with BLAS on one thread (single_threaded_blas), so shares do not fight over the cores.
"""
import contextlib
import ctypes
import functools
import os
import threading

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


def cores_per_process(processes):
    """The cores each of `processes` processes sharing this machine (an MPI job's ranks here) may use:
    a process's own, when its launcher bound it to fewer cores than the machine has (Open MPI binds
    each rank to a core unless oversubscribed), else an equal share of the usable cores (at least one)."""
    bound = hasattr(os, "sched_getaffinity") and len(os.sched_getaffinity(0)) < (os.cpu_count() or 1)
    return usable_cores() if processes == 1 or bound else max(1, usable_cores() // processes)


def set_blas_threads(count):
    """BLAS on `count` threads from now on (where its thread count can be set)."""
    if blas_threads_settable():
        _blas_thread_control()[0](count)


def blas_threads_settable():
    """Whether single_threaded_blas() can work here (the BLAS NumPy loaded was found)."""
    return _blas_thread_control() is not None


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


def keep_freed_memory():
    """Ask glibc's malloc to keep freed memory for reuse instead of returning it to the OS.

    A training step allocates and frees the same activation-sized arrays every step. By default glibc
    maps arrays above a dynamic threshold afresh and trims the heap's free top, so each step pays a
    page fault for every 4 KiB it touches again: 20% of a small model's step time here. With
    allocations up to 32 MiB served from the heap and 64 MiB of free top kept, they are reused.
    It changes the whole process's allocator, so what owns the process asks for it: training and
    classification runs, the shard pool's helpers, the CLI's commands. Importing npllama or calling its
    math (forward, loss_and_grads, generate) does not."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, Windows, musl): their allocators behave differently
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 32 << 20)
    libc.mallopt(m_trim_threshold, 64 << 20)
