"""Weights kept in llama.cpp's quantized blocks and multiplied as stored.

A row of an (out, in) weight is cut into blocks of 32 values; each block keeps small integers and a
float16 scale (ggml-quants.c's reference formulas; d, m rounded to float16 when stored):
    q8_0   d = max|x| / 127          q = round(x / d) ∈ [−127, 127]     x̂ = d·q            34 bytes
    q4_0   d = x_m / −8              q = min(15, ⌊x / d + 8.5⌋)         x̂ = d·(q − 8)      18 bytes
           (x_m: the block's value of largest magnitude, its sign kept)
    q4_1   d = (max − min) / 15,     q = min(15, ⌊(x − m) / d + 0.5⌋)   x̂ = d·q + m        20 bytes
           m = min
round() is half away from zero; a block of zeros has d = 0 and q = 0. Two 4-bit values share a byte:
byte j holds value j in its low nibble and value j + 16 in its high one. GGUF stores a row's blocks
one after another, each as its fields d (m) q (LAYOUTS); so does export.

In memory (and in the npllama weights file) the blocks are laid out for the product instead: by block
column. Row b of `data` holds the b-th block of every output row, field by field: d of all rows, then
(q4_1) m of all rows, then q as (32, out) int8 (q8_0) or (16, out) packed bytes (4-bit): value k of
every row in one run. The scales keep their float16 values but are held as float32 (36, 20 and 24
bytes a block): NumPy widens float16 at ~0.5 G values/s, which cost a third of a 7B token's decode.

Decoding (a few rows of x) sums each block column's products before scaling them:
    P_b = x_b · q_b      x_b: (N, 32) the block's inputs, q_b: (32, out) widened to float32
    y   = Σ_b d_b ⊙ P_b  (+ Σ_b (Σ_k x_b,k) o_b,   o = −8·d for q4_0, m for q4_1)
so the one pass over the weights is NumPy's int8 → float32 cast (4-bit values unpacked to bytes
first; a contiguous run of block columns at a time, into a reusable buffer), then a batched BLAS
product over it; for weights of SHARED_FROM values or more the block columns are shared among the
cores, each summing its own. More rows (a prompt, training LoRA over a quantized base) widen
x̂ itself, a block column group at a time, and multiply by it with BLAS, the output rows shared among
the cores. The backward gives dx = dy Ŵ the same way (a frozen base under LoRA adapters); there is no
gradient for the weight itself. The embedding gathers and widens only the rows it is asked for
(`weight[ids]`).
"""
import functools
import math
import threading

import numpy as np

from .. import backend
from ..errors import UserError
from . import cpu
from .streamed import Streamed, in_threads

BLOCK = 32
PARTIAL_SUMS_UP_TO = 8  # rows of x (decoding's one) multiplied by partial sums (module docstring): measured
                        # as fast as widening x̂ at 8 rows, faster below
WIDENED_VALUES = 1 << 19  # float32 values widened at a time (2 MiB): fastest here for 7B's and 135M's shapes
LAID_OUT_ROWS = 1024  # rows transposed at a time into the layout: 2.8× faster than a whole 7B matrix at once
SHARED_FROM = 2 << 20  # values of a weight from which decoding shares its block columns among the cores: below,
                       # the threads' handing Python's lock back and forth cost more than the second core gave
LAYOUTS = {  # a block's fields, as the bytes lie in GGUF
    "q8_0": np.dtype([("d", "<f2"), ("qs", "i1", (BLOCK,))]),
    "q4_0": np.dtype([("d", "<f2"), ("qs", "u1", (BLOCK // 2,))]),
    "q4_1": np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", (BLOCK // 2,))]),
}


FIELDS = {  # a block column's fields in memory (module docstring): (name, dtype, values per output row)
    "q8_0": (("d", np.float32, 1), ("qs", np.int8, BLOCK)),
    "q4_0": (("d", np.float32, 1), ("qs", np.uint8, BLOCK // 2)),
    "q4_1": (("d", np.float32, 1), ("m", np.float32, 1), ("qs", np.uint8, BLOCK // 2)),
}


class QuantizeError(ValueError):
    """A tensor that cannot be put in blocks (its rows are not a multiple of the block)."""


class NotOnThisDevice(UserError):
    """Quantized blocks are multiplied on the CPU only (the GPU's kernel is the GPU issue's)."""


def quantize(array, kind):
    """An (out, in) float array in `kind`'s blocks (module docstring): a Quantized weight."""
    array = np.asarray(array, dtype=np.float32)
    if array.ndim != 2 or array.shape[1] % BLOCK:
        raise QuantizeError(f"{kind} quantizes matrices whose rows are a multiple of {BLOCK} values, "
                            f"not shape {array.shape}")
    x = array.reshape(array.shape[0], -1, BLOCK)
    blocks = np.zeros(x.shape[:2], dtype=LAYOUTS[kind])
    _QUANTIZERS[kind](x, blocks)
    return Quantized.from_blocks(kind, blocks)


def _scale_inverse(d):
    with np.errstate(divide="ignore"):
        return np.where(d == 0, np.float32(0), np.float32(1) / d)


def _quantize_q8_0(x, blocks):
    d = np.abs(x).max(axis=-1, keepdims=True) / np.float32(127)
    scaled = x * _scale_inverse(d)
    blocks["qs"] = np.sign(scaled) * np.floor(np.abs(scaled) + np.float32(0.5))  # round half away from zero
    blocks["d"] = d[..., 0]


def _quantize_q4_0(x, blocks):
    extreme = np.take_along_axis(x, np.abs(x).argmax(axis=-1)[..., None], axis=-1)
    d = extreme / np.float32(-8)
    q = np.minimum(np.trunc(x * _scale_inverse(d) + np.float32(8.5)), 15).astype(np.uint8)
    blocks["qs"] = _pack(q)
    blocks["d"] = d[..., 0]


def _quantize_q4_1(x, blocks):
    low, high = x.min(axis=-1, keepdims=True), x.max(axis=-1, keepdims=True)
    d = (high - low) / np.float32(15)
    q = np.minimum(np.trunc((x - low) * _scale_inverse(d) + np.float32(0.5)), 15).astype(np.uint8)
    blocks["qs"] = _pack(q)
    blocks["d"], blocks["m"] = d[..., 0], low[..., 0]


_QUANTIZERS = {"q8_0": _quantize_q8_0, "q4_0": _quantize_q4_0, "q4_1": _quantize_q4_1}


def _pack(q):
    """(…, 32) values 0-15 -> (…, 16) bytes: value j low, value j + 16 high."""
    return q[..., :BLOCK // 2] | (q[..., BLOCK // 2:] << np.uint8(4))


def block_bytes(kind):
    """Bytes a block takes in memory (FIELDS): 36 for q8_0, 20 for q4_0, 24 for q4_1."""
    return sum(np.dtype(dtype).itemsize * count for _, dtype, count in FIELDS[kind])


def stored_shape(kind, shape):
    """The shape of an (out, in) weight's `data`: (in / 32, out × block bytes), uint8."""
    out, width = shape
    return width // BLOCK, out * block_bytes(kind)


SEPARATOR = "@"  # as_arrays' names: NAME@q8_0


def as_arrays(params):
    """params with each Quantized weight as its bytes (`data`: in / 32, out × block bytes) under
    NAME@KIND: what the shard pool shares between processes (plain arrays only); from_arrays undoes it."""
    return {f"{name}{SEPARATOR}{value.kind}" if isinstance(value, Quantized) else name:
            value.data if isinstance(value, Quantized) else value for name, value in params.items()}


def from_arrays(arrays):
    """Inverse of as_arrays."""
    params = {}
    for name, value in arrays.items():
        base, _, kind = name.partition(SEPARATOR)
        params[base] = Quantized(kind, value) if kind else value
    return params


class Quantized(Streamed):
    """An (out, in) weight held as `kind` blocks: `data`, uint8 (in / 32, out × block bytes), a block
    column a row (module docstring). A weight of the product seam (ops/linear.py), and an embedding
    table (weight[ids])."""

    def __init__(self, kind, data):
        if kind not in LAYOUTS:
            raise QuantizeError(f"unknown block type {kind!r}; npllama keeps {', '.join(LAYOUTS)}")
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] % block_bytes(kind):
            raise QuantizeError(f"{kind} blocks must be a 2-D uint8 array of whole block columns, got "
                                f"{data.dtype} {data.shape}")
        super().__init__(data, np.float32)
        self.kind, self.data = kind, data
        self.planes = _planes(kind, data.view(np.ndarray))  # a memmap's slices cost Python calls: 10% of decode

    @classmethod
    def from_blocks(cls, kind, blocks):
        """The weight of GGUF-ordered blocks (structured LAYOUTS[kind], (out, in / 32)), laid out anew."""
        out, columns = blocks.shape
        weight = cls(kind, np.empty(stored_shape(kind, (out, columns * BLOCK)), dtype=np.uint8))
        for field, plane in weight.planes.items():
            for start in range(0, out, LAID_OUT_ROWS):
                values = blocks[field][start:start + LAID_OUT_ROWS]  # (rows, columns) or (rows, columns, values)
                plane[..., start:start + LAID_OUT_ROWS] = values.T if values.ndim == 2 else values.transpose(1, 2, 0)
        return weight

    @classmethod
    def from_bytes(cls, kind, data, shape):
        """The weight of `shape` (out, in) whose blocks are the bytes of a GGUF tensor (GGUF's order)."""
        _check_size(kind, data, shape)
        out, width = shape
        blocks = np.ascontiguousarray(data).reshape(-1).view(LAYOUTS[kind]).reshape(out, width // BLOCK)
        return cls.from_blocks(kind, blocks)

    @classmethod
    def from_data(cls, kind, data, shape):
        """The weight of `shape` (out, in) on bytes in this class's layout (the `data` of a weight; the
        weights file's tensor, memory-mapped: used as it is)."""
        if kind not in LAYOUTS:
            raise QuantizeError(f"unknown block type {kind!r}; npllama keeps {', '.join(LAYOUTS)}")
        expected = stored_shape(kind, shape)
        if shape[1] % BLOCK or data.size != expected[0] * expected[1] or (data.ndim == 2 and data.shape != expected):
            raise QuantizeError(f"{data.size:,} bytes are not {kind} blocks of a {shape[0]} × {shape[1]} "
                                f"weight ({expected[0] * expected[1]:,} bytes)")
        return cls(kind, data.reshape(expected))

    @property
    def blocks(self):
        """The blocks in GGUF's order: structured LAYOUTS[kind], (out, in / 32) (a new array)."""
        blocks = np.empty((self.shape[0], self.shape[1] // BLOCK), dtype=LAYOUTS[self.kind])
        for field, plane in self.planes.items():
            blocks[field] = plane.T if plane.ndim == 2 else plane.transpose(2, 0, 1)
        return blocks

    @property
    def shape(self):
        return self.data.shape[1] // block_bytes(self.kind), len(self.data) * BLOCK

    @property
    def nbytes(self):
        return self.data.nbytes

    @property
    def values(self):
        """What the model reads besides products: the weight itself (an embedding gathers its rows)."""
        return self

    def converted(self, convert, matrix):
        """Kept as blocks, whatever the compute dtype (a product widens to float32)."""
        return self

    def forward(self, x):
        if backend.array_module(x) is not np:
            raise NotOnThisDevice("quantized weights are multiplied on the CPU only for now: use --device cpu, "
                                  "or load-weights --dtype fp16 for the GPU")
        rows = x.reshape(-1, x.shape[-1])
        if len(rows) > PARTIAL_SUMS_UP_TO:
            return super().forward(x)
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        columns = len(self.data)
        workers = max(1, min(cpu.usable_cores(), columns)) if self.shape[0] * self.shape[1] >= SHARED_FROM else 1
        bounds = [columns * share // workers for share in range(workers + 1)]
        partial = in_threads([functools.partial(self._partial_sums, rows, first, end)
                              for first, end in zip(bounds, bounds[1:])])
        return functools.reduce(np.add, partial).reshape(*x.shape[:-1], self.shape[0]), None

    def _partial_sums(self, x, first, end):
        """Σ_b d_b ⊙ (x_b · q_b) (+ the offsets) over block columns first … end − 1 (module docstring):
        (N, out) for x (N, in)."""
        planes = _sliced(self.planes, slice(first, end))
        xb = np.ascontiguousarray(x.reshape(len(x), -1, BLOCK)[:, first:end].transpose(1, 0, 2))  # (columns, N, 32)
        sums = _scratch("sums", (end - first, len(x), self.shape[0]))
        widening = _Widening(self.kind, planes["qs"])
        for run in widening.runs():
            np.matmul(xb[run], widening(run), out=sums[run])
        sums *= planes["d"][:, None, :]
        y = sums.sum(axis=0)
        offsets = _offsets(self.kind, planes)
        if offsets is not None:
            y += xb.sum(axis=-1).T @ offsets
        return y

    def multiply(self, x, start, end, out):
        """out = x · Ŵ[start:end]ᵀ, a block column group of x̂ widened at a time (x: (N, in))."""
        planes = _sliced(self.planes, slice(None), slice(start, end))
        widening = _Widening(self.kind, planes["qs"])
        for run in widening.runs():
            part = x[:, run.start * BLOCK:run.stop * BLOCK] @ widening.dequantized(run, planes)
            if run.start == 0:
                out[...] = part
            else:
                out += part

    def _blocks(self):
        """Output rows in one range per usable core (their block columns are read in runs of that many)."""
        out = self.shape[0]
        workers = max(1, min(cpu.usable_cores(), out))
        return ((out * share // workers, out * (share + 1) // workers) for share in range(workers))

    def __getitem__(self, ids):
        """The rows ids (any integer array), widened: ids.shape + (in,). Each row's values lie one per
        block column and value (in of them, `out` bytes apart): an untied embedding memory-mapped from
        a file has most of its pages read in after a few tokens."""
        ids = np.asarray(ids)
        return self._rows(ids.reshape(-1)).reshape(*ids.shape, self.shape[1])

    def widen(self, start, end):
        """Rows start … end − 1 as float32 (out, in)."""
        return self._rows(slice(start, end))

    def _rows(self, rows):
        """x̂ of output rows `rows` (a slice or an index array): float32 (rows, in), a new array."""
        planes = _sliced(self.planes, slice(None), rows)
        values = planes["qs"] if self.kind == "q8_0" else _unpacked(planes["qs"])
        values = _dequantized(self.kind, values.astype(np.float32), planes)  # (columns, 32, rows)
        return np.ascontiguousarray(values.transpose(2, 0, 1)).reshape(values.shape[2], self.shape[1])

    def input_grad(self, dy):
        """dx = dy Ŵ, a block column group at a time (backward's dx; the blocks get no gradient: frozen)."""
        rows = dy.reshape(-1, dy.shape[-1]).astype(np.float32, copy=False)
        dx = np.empty((rows.shape[0], self.shape[1]), dtype=np.float32)
        widening = _Widening(self.kind, self.planes["qs"])
        for run in widening.runs():
            np.matmul(rows, widening.dequantized(run, self.planes).T, out=dx[:, run.start * BLOCK:run.stop * BLOCK])
        return dx.reshape(*dy.shape[:-1], self.shape[1]).astype(dy.dtype, copy=False)

    def dequantized(self):
        """The whole weight as float32 (for writing it elsewhere, and for tests): a new array."""
        return self.widen(0, self.shape[0])


def _planes(kind, data):
    """The fields of `data` (Quantized's layout) as arrays over all its block columns (views): d (and m):
    (columns, out) float32; qs: (columns, 32, out) int8 for q8_0, (columns, 16, out) bytes for 4-bit."""
    out, spans = data.shape[1] // block_bytes(kind), _spans(kind, data.shape[1] // block_bytes(kind))
    planes = {}
    for name, dtype, count in FIELDS[kind]:
        start, stop = spans[name]
        plane = data[:, start:stop].view(dtype).reshape(len(data), count, out)
        planes[name] = plane[:, 0] if count == 1 else plane
    return planes


def _sliced(planes, columns, rows=slice(None)):
    """The planes of some block columns and output rows (slices: views; an index array: copies)."""
    return {name: plane[columns, ..., rows] for name, plane in planes.items()}


class _Widening:
    """Runs of block columns' q (a qs plane: (columns, 32 or 16, rows)) widened to float32, a run at a
    time into buffers this thread keeps, so that no fresh pages are touched: as many columns as fill
    WIDENED_VALUES, at least one. (The buffers are found once per product: per run, it slowed two
    threads by 40%.)"""

    def __init__(self, kind, qs):
        self.kind, self.qs = kind, qs
        self.step = max(1, WIDENED_VALUES // (BLOCK * max(1, qs.shape[-1])))
        shape = (min(self.step, len(qs)), BLOCK, qs.shape[-1])
        self.values = _scratch("values", shape, np.float32)
        self.nibbles = None if kind == "q8_0" else _scratch("nibbles", shape, np.uint8)

    def runs(self):
        """Slices of the block columns, a run each."""
        return [slice(start, min(start + self.step, len(self.qs))) for start in range(0, len(self.qs), self.step)]

    def __call__(self, run):
        """The run's q as float32: (columns, 32, rows), a view of this thread's buffer."""
        count = run.stop - run.start
        q = self.qs[run] if self.kind == "q8_0" else _unpacked(self.qs[run], self.nibbles[:count])
        np.copyto(self.values[:count], q, casting="unsafe")
        return self.values[:count]

    def dequantized(self, run, planes):
        """x̂ᵀ of the run (planes: those of all the columns): float32 (columns × 32, rows), in the buffer."""
        values = _dequantized(self.kind, self(run), _sliced(planes, run))
        return values.reshape(-1, values.shape[-1])


def _dequantized(kind, values, planes):
    """x̂ (module docstring) from the widened q (columns, 32, rows), in place."""
    if kind == "q4_0":
        values -= np.float32(8)
    values *= planes["d"][:, None, :]
    if kind == "q4_1":
        values += planes["m"][:, None, :]
    return values


def _offsets(kind, planes):
    """o_b of the partial sums (module docstring): what each block adds per unit of Σ_k x_b,k."""
    if kind == "q4_0":
        return planes["d"] * np.float32(-8)
    return planes.get("m")  # q4_1's; q8_0 has none


def _unpacked(qs, values=None):
    """4-bit q (…, 16, rows) bytes -> (…, 32, rows) uint8 (into `values` when given): value k from byte
    k's low nibble, value k + 16 from its high one."""
    if values is None:
        values = np.empty((*qs.shape[:-2], BLOCK, qs.shape[-1]), dtype=np.uint8)
    np.bitwise_and(qs, 15, out=values[..., :BLOCK // 2, :])
    np.right_shift(qs, 4, out=values[..., BLOCK // 2:, :])
    return values


_buffers = threading.local()


def _scratch(name, shape, dtype=np.float32):
    """An array of `shape` in this thread's buffer `name` (kept between products: no fresh pages)."""
    size = math.prod(shape)
    buffer = getattr(_buffers, name, None)
    if buffer is None or buffer.size < size:
        buffer = np.empty(size, dtype=dtype)
        setattr(_buffers, name, buffer)
    return buffer[:size].reshape(shape)


def _check_size(kind, data, shape):
    out, width = shape
    if kind not in LAYOUTS:
        raise QuantizeError(f"unknown block type {kind!r}; npllama keeps {', '.join(LAYOUTS)}")
    if width % BLOCK or data.size != out * width // BLOCK * LAYOUTS[kind].itemsize:
        raise QuantizeError(f"{data.size:,} bytes are not {kind} blocks of a {out} × {width} weight "
                            f"({out * width // BLOCK * LAYOUTS[kind].itemsize:,} bytes)")


def _spans(kind, rows):
    """field -> (first, end) byte of its run in a block column of `rows` output rows (FIELDS' order)."""
    spans, first = {}, 0
    for name, dtype, count in FIELDS[kind]:
        end = first + rows * count * np.dtype(dtype).itemsize
        spans[name], first = (first, end), end
    return spans
