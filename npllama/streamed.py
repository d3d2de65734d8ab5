"""Weights used as they are stored, widened a block of rows at a time inside the product.

A Llama-2-7B checkpoint is 13.5 GB in float16, 27 GB once widened to the float32 that NumPy computes
in: more than a 24 GB machine holds. Generation then multiplies by the memory-mapped float16 weights
directly: each product widens one block of rows, multiplies by it, and reuses the space for the next
block. Widening a whole layer instead writes and reads back twice its stored size and faults in fresh
pages for it at every token (5× slower for Llama-2-7B).

    y = x Wᵀ,  W = [s₁·S₁[o₁]; s₂·S₂[o₂]; …]          x: (..., in)   y: (..., out)
Each part is a stored matrix Sᵢ: (rowsᵢ, in) with an optional row order oᵢ and a scale sᵢ; the parts are
stacked along the output axis. That is how attention's fused q/k/v weight is built without a copy:
S[o] is `rope.to_pairs` and s = 1/√hd scales q (attention.fused_qkv_weight). Per block of rows:
    y[..., rows] = s · x · widen(S[o[rows]])ᵀ
The blocks are shared among the CPU's cores: NumPy's casts and BLAS release Python's lock, so threads
run them side by side, with BLAS on one thread each. Inference only: there is no backward.
"""
import concurrent.futures
import dataclasses
import functools

import numpy as np

from . import backend, dtypes

BLOCK_BYTES = 2 << 20  # widened rows per block: a core's block and its stored rows fit in its L2 cache


@dataclasses.dataclass(frozen=True)
class _Part:
    stored: object        # (rows, in) NumPy array, often memory-mapped, in its stored dtype
    order: object = None  # row indices into stored, or None for stored's own order
    scale: float = 1.0

    @property
    def rows(self):
        return self.stored.shape[0] if self.order is None else len(self.order)


class Streamed:
    """An (out, in) weight kept as stored and computed in `dtype` block by block (module docstring).
    Streamed.of(stored, dtype) makes one; w[order] (rows reordered), w * scale and stack([w, …]) are
    what building a fused weight needs."""

    def __init__(self, parts, dtype):
        self.parts, self.dtype = tuple(parts), np.dtype(dtype)

    @classmethod
    def of(cls, stored, dtype):
        return cls([_Part(stored)], dtype)

    @property
    def shape(self):
        return sum(part.rows for part in self.parts), self.parts[0].stored.shape[1]

    def _only_part(self):
        if len(self.parts) != 1:
            raise ValueError("reorder or scale a Streamed weight before stacking it")
        return self.parts[0]

    def __getitem__(self, order):
        part = self._only_part()
        order = np.asarray(order)
        if order.ndim != 1 or order.dtype.kind not in "iu":
            raise TypeError("a Streamed weight's rows are reordered by a 1-D array of row indices")
        if order.size and not 0 <= order.min() <= order.max() < part.rows:
            raise IndexError(f"row indices must lie in [0, {part.rows})")
        order = order if part.order is None else part.order[order]
        return Streamed([dataclasses.replace(part, order=order)], self.dtype)

    def __mul__(self, scale):
        part = self._only_part()
        return Streamed([dataclasses.replace(part, scale=part.scale * float(scale))], self.dtype)

    def product(self, x):
        """x Wᵀ: (..., in) -> (..., out), in self.dtype. The blocks are dealt out to the usable cores,
        one thread each, with BLAS set to one thread meanwhile (backend.single_threaded_blas)."""
        rows = np.ascontiguousarray(x.reshape(-1, x.shape[-1]), dtype=self.dtype)
        y = np.empty((rows.shape[0], self.shape[0]), dtype=self.dtype)
        blocks = list(self._blocks())
        workers = max(1, min(backend.usable_cores(), len(blocks)))
        if workers == 1 or not backend.blas_threads_settable():
            _multiply(rows, blocks, y)
        else:
            shares = [blocks[i::workers] for i in range(workers)]  # interleaved: every part is split
            with backend.single_threaded_blas():
                helpers = [_pool(workers - 1).submit(_multiply, rows, share, y) for share in shares[1:]]
                try:
                    _multiply(rows, shares[0], y)
                finally:
                    for helper in helpers:  # BLAS goes back to its threads only once they are done
                        helper.result()
        return y.reshape(*x.shape[:-1], self.shape[0])

    def _blocks(self):
        """(part, first row, end row, first output column) for every block of every part."""
        per_block = max(1, BLOCK_BYTES // (self.shape[1] * self.dtype.itemsize))
        column = 0
        for part in self.parts:
            for start in range(0, part.rows, per_block):
                yield part, start, min(start + per_block, part.rows), column + start
            column += part.rows


def stack(weights):
    """The Streamed weights stacked along the output axis (as np.concatenate stacks arrays)."""
    if len({weight.dtype for weight in weights}) != 1 or len({weight.shape[1] for weight in weights}) != 1:
        raise ValueError("stacked Streamed weights must share their compute dtype and input width")
    return Streamed([part for weight in weights for part in weight.parts], weights[0].dtype)


def _multiply(x, blocks, y):
    """y[:, columns of each block] = scale · x · widen(block)ᵀ."""
    for part, start, end, column in blocks:
        stored = part.stored[start:end] if part.order is None else part.stored[part.order[start:end]]
        out = y[:, column:column + end - start]
        np.matmul(x, dtypes.compute_array(stored, y.dtype).T, out=out)
        if part.scale != 1.0:
            out *= part.scale


@functools.lru_cache(maxsize=None)
def _pool(threads):
    return concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="npllama-streamed")
