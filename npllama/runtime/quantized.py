"""Weights kept in llama.cpp's quantized blocks and multiplied as stored.

A row of an (out, in) weight is cut into blocks of 32 values; each block keeps small integers and a
float16 scale (ggml-quants.c's reference formulas; d, m rounded to float16 when stored):
    q8_0   d = max|x| / 127          q = round(x / d) ∈ [−127, 127]     x̂ = d·q            34 bytes
    q4_0   d = x_m / −8              q = min(15, ⌊x / d + 8.5⌋)         x̂ = d·(q − 8)      18 bytes
           (x_m: the block's value of largest magnitude, its sign kept)
    q4_1   d = (max − min) / 15,     q = min(15, ⌊(x − m) / d + 0.5⌋)   x̂ = d·q + m        20 bytes
           m = min
round() is half away from zero; a block of zeros has d = 0 and q = 0. Two 4-bit values share a byte:
byte j holds value j in its low nibble and value j + 16 in its high one.

In memory (and in the npllama weights file) a row's bytes are its blocks' fields one after another,
field by field: all the row's d, then (q4_1) all its m, then all its q. GGUF interleaves them block by
block (d q d q …, LAYOUTS); reading them strided, NumPy's int8 → float32 cast ran 3 times slower than
over the long runs of q of this layout, so a GGUF tensor is laid out anew when read (a copy of its bytes).

The product widens one block of rows at a time into float32 and multiplies with BLAS, the blocks
shared among the cores as runtime/streamed.py does; a token's decode then reads about a quarter
(q8_0) or an eighth (q4_*) of float32's bytes. The backward gives dx = dy Ŵ the same way (a frozen
base under LoRA adapters); there is no gradient for the weight itself. The embedding gathers and
widens only the rows it is asked for (`weight[ids]`).
"""
import numpy as np

from .. import backend
from ..errors import UserError
from .streamed import Streamed

BLOCK = 32
PARTIAL_SUMS_UP_TO = 4  # rows of x (decoding's one) multiplied by Quantized.multiply's partial sums
LAYOUTS = {  # a block's fields, as the bytes lie in GGUF
    "q8_0": np.dtype([("d", "<f2"), ("qs", "i1", (BLOCK,))]),
    "q4_0": np.dtype([("d", "<f2"), ("qs", "u1", (BLOCK // 2,))]),
    "q4_1": np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", (BLOCK // 2,))]),
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


def dequantize(kind, planes):
    """x̂ (module docstring) from the planes of some rows (Quantized.planes: d, m, qs by block): float32
    (rows, in). 4-bit values are unpacked into int8 first, so that one float pass widens and scales
    together (float16 scales widened once per block, not per value)."""
    x = np.multiply(integers(kind, planes["qs"]), planes["d"].astype(np.float32)[..., None], dtype=np.float32)
    if kind == "q4_1":
        x += planes["m"].astype(np.float32)[..., None]
    return x.reshape(x.shape[0], -1)


def integers(kind, qs):
    """The blocks' q as int8 (…, 32): q8_0's as they are; 4-bit ones unpacked (q4_0's less 8)."""
    if kind == "q8_0":
        return qs
    q = np.empty((*qs.shape[:-1], BLOCK), dtype=np.int8)
    np.bitwise_and(qs, 15, out=q[..., :BLOCK // 2], casting="unsafe")
    np.right_shift(qs, 4, out=q[..., BLOCK // 2:], casting="unsafe")
    if kind == "q4_0":
        q -= np.int8(8)
    return q


def row_bytes(kind, width):
    """Bytes of a row of `width` values in kind's blocks."""
    return width // BLOCK * LAYOUTS[kind].itemsize


SEPARATOR = "@"  # as_arrays' names: NAME@q8_0


def as_arrays(params):
    """params with each Quantized weight as its blocks' bytes (out, in / 32 × block bytes) under
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
    """An (out, in) weight held as `kind` blocks: `data`, uint8 (out, in / 32 × block bytes), each row's
    fields one after another (module docstring). A weight of the product seam (ops/linear.py), and an
    embedding table (weight[ids])."""

    def __init__(self, kind, data):
        if kind not in LAYOUTS:
            raise QuantizeError(f"unknown block type {kind!r}; npllama keeps {', '.join(LAYOUTS)}")
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] % LAYOUTS[kind].itemsize:
            raise QuantizeError(f"{kind} rows must be a 2-D uint8 array of whole blocks, got {data.dtype} "
                                f"{data.shape}")
        super().__init__(data, np.float32)
        self.kind, self.data = kind, data

    @classmethod
    def from_blocks(cls, kind, blocks):
        """The weight of GGUF-ordered blocks (structured LAYOUTS[kind], (out, in / 32)), laid out anew."""
        data = np.empty((blocks.shape[0], blocks.shape[1] * LAYOUTS[kind].itemsize), dtype=np.uint8)
        for field, (start, end) in _fields(kind, blocks.shape[1]).items():
            data[:, start:end] = np.ascontiguousarray(blocks[field]).view(np.uint8).reshape(len(blocks), -1)
        return cls(kind, data)

    @classmethod
    def from_bytes(cls, kind, data, shape):
        """The weight of `shape` (out, in) whose blocks are the bytes of a GGUF tensor (GGUF's order)."""
        _check_size(kind, data, shape)
        out, width = shape
        blocks = np.ascontiguousarray(data).reshape(-1).view(LAYOUTS[kind]).reshape(out, width // BLOCK)
        return cls.from_blocks(kind, blocks)

    @classmethod
    def from_rows(cls, kind, data, shape):
        """The weight of `shape` (out, in) on bytes in this class's layout (`data` of a weight; the
        weights file's tensor, memory-mapped: used as it is)."""
        _check_size(kind, data, shape)
        return cls(kind, data.reshape(shape[0], row_bytes(kind, shape[1])))

    @property
    def blocks(self):
        """The blocks in GGUF's order: structured LAYOUTS[kind], (out, in / 32) (a new array)."""
        blocks = np.empty((self.shape[0], self.shape[1] // BLOCK), dtype=LAYOUTS[self.kind])
        for field, plane in self.planes(0, self.shape[0]).items():
            blocks[field] = plane
        return blocks

    def planes(self, start, end):
        """Rows start … end − 1 as their fields' arrays (views): d (and m): (rows, n) float16; qs: (rows, n,
        32) int8 for q8_0, (rows, n, 16) uint8 for the 4-bit types."""
        rows, n = self.data[start:end], self.shape[1] // BLOCK
        return {field: rows[:, first:last].view(LAYOUTS[self.kind][field].base).reshape(len(rows), n,
                                                                                       *LAYOUTS[self.kind][field].shape)
                for field, (first, last) in _fields(self.kind, n).items()}

    @property
    def shape(self):
        return self.data.shape[0], self.data.shape[1] // LAYOUTS[self.kind].itemsize * BLOCK

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

    def widen(self, start, end):
        return dequantize(self.kind, self.planes(start, end))

    def forward(self, x):
        if backend.array_module(x) is not np:
            raise NotOnThisDevice("quantized weights are multiplied on the CPU only for now: use --device cpu, "
                                  "or load-weights --dtype fp16 for the GPU")
        return super().forward(x)

    def multiply(self, x, start, end, out):
        """out = x · Ŵ[start:end]ᵀ. For a few rows of x (decoding) the scales are applied to partial sums
        rather than to the weights: with P[b, r, n] = Σ_k q[r, b, k] · x[n, b, k], a batched product per
        block column b, out[n, r] = Σ_b d[r, b] · P[b, r, n] (+ Σ_b m[r, b] · Σ_k x[n, b, k] for q4_1).
        The q are only widened, not scaled: one pass over the weights instead of two."""
        if len(x) > PARTIAL_SUMS_UP_TO:
            return super().multiply(x, start, end, out)
        planes = self.planes(start, end)
        n = self.shape[1] // BLOCK
        q = integers(self.kind, planes["qs"]).astype(np.float32)                       # (rows, n, 32)
        xb = x.reshape(len(x), n, BLOCK)
        partial = np.matmul(q.transpose(1, 0, 2), xb.transpose(1, 2, 0))              # (n, rows, N)
        np.einsum("brn,rb->nr", partial, planes["d"].astype(np.float32), out=out)
        if self.kind == "q4_1":
            out += xb.sum(axis=-1) @ planes["m"].astype(np.float32).T

    def __getitem__(self, ids):
        """The rows ids (any integer array), widened: ids.shape + (in,)."""
        ids = np.asarray(ids)
        rows = Quantized(self.kind, self.data[ids.reshape(-1)])
        return rows.widen(0, len(rows.data)).reshape(*ids.shape, self.shape[1])

    def input_grad(self, dy):
        """dx = dy Ŵ, a block of rows at a time (backward's dx; the blocks get no gradient: frozen)."""
        rows = dy.reshape(-1, dy.shape[-1])
        dx = np.zeros((rows.shape[0], self.shape[1]), dtype=np.float32)
        for start, end in self._blocks():
            dx += rows[:, start:end].astype(np.float32, copy=False) @ self.widen(start, end)
        return dx.reshape(*dy.shape[:-1], self.shape[1]).astype(dy.dtype, copy=False)

    def dequantized(self):
        """The whole weight as float32 (for writing it elsewhere, and for tests)."""
        return self.widen(0, self.shape[0])


def _check_size(kind, data, shape):
    out, width = shape
    if kind not in LAYOUTS:
        raise QuantizeError(f"unknown block type {kind!r}; npllama keeps {', '.join(LAYOUTS)}")
    if width % BLOCK or data.size != out * row_bytes(kind, width):
        raise QuantizeError(f"{data.size:,} bytes are not {kind} blocks of a {out} × {width} weight "
                            f"({out * row_bytes(kind, width):,} bytes)")


def _fields(kind, blocks):
    """field -> (first, end) byte of its run in a row of `blocks` blocks (the fields in LAYOUTS' order)."""
    spans, first = {}, 0
    for field in LAYOUTS[kind].names:
        end = first + blocks * LAYOUTS[kind][field].itemsize
        spans[field], first = (first, end), end
    return spans
