"""Weights used as they are stored, widened a block of rows at a time inside the product.

A Llama-2-7B checkpoint is 13.5 GB in float16, 27 GB once widened to the float32 that NumPy computes
in: more than a 24 GB machine holds. Generation then multiplies by the memory-mapped float16 weights
directly: each product widens one block of rows, multiplies by it, and reuses the space for the next
block. Widening a whole layer instead writes and reads back twice its stored size and faults in fresh
pages for it at every token (5× slower for Llama-2-7B).

    y = x Wᵀ,  per block of rows:  y[..., rows] = x · widen(W[rows])ᵀ      x: (..., in)   W: (out, in)
The blocks are shared among the CPU's cores: NumPy's casts and BLAS release Python's lock, so threads
run them side by side, with BLAS on one thread each. A Streamed weight is a weight of the product seam
(ops/linear.py): reordering its rows for attention's fused q, k, v is linear.Fused's. Inference only:
there is no backward.
"""
import concurrent.futures
import functools
import threading

import numpy as np

from .. import dtypes
from . import cpu

POOL = "npllama-streamed"  # the name of in_threads' threads
BLOCK_BYTES = 2 << 20  # widened rows per block: a core's block and its stored rows fit in its L2 cache


class Streamed:
    """An (out, in) weight kept as stored (a NumPy array, often memory-mapped) and computed in `dtype`
    block by block (module docstring)."""

    def __init__(self, stored, dtype):
        self.stored, self.dtype = stored, np.dtype(dtype)

    @property
    def shape(self):
        return self.stored.shape

    def forward(self, x):
        """x Wᵀ: (..., in) -> (..., out), in self.dtype. The blocks are dealt out to the usable cores
        (in_threads)."""
        rows = np.ascontiguousarray(x.reshape(-1, x.shape[-1]), dtype=self.dtype)
        y = np.empty((rows.shape[0], self.shape[0]), dtype=self.dtype)
        blocks = list(self._blocks())
        workers = max(1, min(cpu.usable_cores(), len(blocks)))
        shares = [blocks[i::workers] for i in range(workers)]  # interleaved: neighbours run together
        in_threads([functools.partial(self._multiply, rows, share, y) for share in shares])
        return y.reshape(*x.shape[:-1], self.shape[0]), None

    def backward(self, dy, cache):
        """(dx, None): the weight itself gets no gradient."""
        return self.input_grad(dy), None

    def input_grad(self, dy):
        raise TypeError("a streamed weight is for inference: it has no backward")

    def widen(self, start, end):
        """Rows start … end − 1 in the compute dtype (a weight stored otherwise overrides this)."""
        return dtypes.compute_array(self.stored[start:end], self.dtype)

    def multiply(self, x, start, end, out):
        """out = x · W[start:end]ᵀ (x: (N, in), out: (N, end − start))."""
        np.matmul(x, self.widen(start, end).T, out=out)

    def _multiply(self, x, blocks, y):
        """y[:, rows of each block] = x · W[rows]ᵀ."""
        for start, end in blocks:
            self.multiply(x, start, end, y[:, start:end])

    def _blocks(self):
        """(first row, end row) of every block."""
        per_block = max(1, BLOCK_BYTES // (self.shape[1] * self.dtype.itemsize))
        return ((start, min(start + per_block, self.shape[0])) for start in range(0, self.shape[0], per_block))


def in_threads(tasks):
    """Each task's result, the tasks run side by side, one thread each (the caller's the first), with
    BLAS on one thread meanwhile (cpu.single_threaded_blas): a core each. Called from one of those
    threads (a task sharing out work itself), the tasks run one after another there instead: the cores
    are taken, and waiting for the pool from inside it could wait for ever."""
    if len(tasks) == 1 or not cpu.blas_threads_settable() or threading.current_thread().name.startswith(POOL):
        return [task() for task in tasks]
    with cpu.single_threaded_blas():
        helpers = [_pool(len(tasks) - 1).submit(task) for task in tasks[1:]]
        try:
            first = tasks[0]()
        finally:
            concurrent.futures.wait(helpers)  # BLAS gets its threads back once they are all done
    return [first, *(helper.result() for helper in helpers)]


@functools.lru_cache(maxsize=None)
def _pool(threads):
    return concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix=POOL)
