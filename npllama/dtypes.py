"""Floating-point storage types, and bfloat16 without library support.

Weights are kept in the dtype they were stored in: float32, float16 or bfloat16, or in llama.cpp's
quantized blocks (runtime/quantized.py), whose storage type is named by the block type: "q8_0", "q4_0",
"q4_1" (a string, as no NumPy dtype describes a block of several values). NumPy (and CuPy) have
no bfloat16, so a bf16 tensor is held as its raw 16-bit patterns under a tagged dtype, BFLOAT16,
on which arithmetic fails loudly instead of silently treating the bits as integers.

bfloat16 is the top half of a float32 (sign, 8 exponent bits, 7 mantissa bits), so:
    widen:   f32_bits = bf16_bits << 16                    (exact)
    narrow:  bf16_bits = (f32_bits + 0x7FFF + lsb) >> 16   round to nearest, ties to even,
             where lsb = (f32_bits >> 16) & 1; NaN keeps a quiet-NaN pattern.
"""
import numpy as np

BFLOAT16 = np.dtype([("bfloat16", "<u2")])

# Names a user may give (CLI --dtype) -> storage dtype.
BY_NAME = {"fp32": np.dtype(np.float32), "float32": np.dtype(np.float32),
           "fp16": np.dtype(np.float16), "float16": np.dtype(np.float16),
           "bf16": BFLOAT16, "bfloat16": BFLOAT16,
           "fp64": np.dtype(np.float64), "float64": np.dtype(np.float64)}

# safetensors' dtype codes (the floating ones npllama stores, and integer ones it reads).
SAFETENSORS_CODES = {"F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": BFLOAT16,
                     "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"),
                     "I8": np.dtype("i1"), "U8": np.dtype("u1"), "BOOL": np.dtype("?")}
QUANTIZED = ("q8_0", "q4_0", "q4_1")  # block types, runtime/quantized.py's LAYOUTS


def resolve(dtype):
    """A storage type from a name ('fp16', 'bf16', 'q8_0', ...) or anything np.dtype accepts: a dtype, or
    a block type's name."""
    if isinstance(dtype, str) and dtype.lower() in QUANTIZED:
        return dtype.lower()
    if isinstance(dtype, str) and dtype.lower() in BY_NAME:
        return BY_NAME[dtype.lower()]
    return BFLOAT16 if dtype is BFLOAT16 else np.dtype(dtype)


def is_quantized(dtype):
    """Whether a storage type (resolved) is a block type rather than a dtype."""
    return isinstance(dtype, str)


def name(dtype):
    """Short name of a storage type: 'fp32', 'fp16', 'bf16', 'fp64', or a block type ('q8_0')."""
    dtype = resolve(dtype)
    if is_quantized(dtype):
        return dtype
    return {np.float32: "fp32", np.float16: "fp16", np.float64: "fp64"}.get(dtype.type, "bf16") \
        if dtype == BFLOAT16 or dtype.kind == "f" else str(dtype)


def is_bfloat16(array):
    return array.dtype == BFLOAT16


def widen_bfloat16(array):
    """bf16 patterns (any shape) -> float32 values, exactly: the 16 bits become the float's top half."""
    bits = array.view(np.uint16).astype(np.uint32)
    bits <<= 16
    return bits.view(np.float32)


def narrow_to_bfloat16(array):
    """float values -> BFLOAT16, rounding to nearest with ties to even (as torch does)."""
    bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> 16) & 1)) >> 16
    rounded = np.where(np.isnan(array), np.uint32(0x7FC0), rounded)
    return rounded.astype(np.uint16).view(BFLOAT16)


def convert(array, dtype):
    """A host array as the storage dtype asked for (bf16 widened or narrowed as needed); no copy when
    it already is."""
    dtype = resolve(dtype)
    if array.dtype == dtype:
        return array
    if is_bfloat16(array):
        array = widen_bfloat16(array)
    return narrow_to_bfloat16(array) if dtype == BFLOAT16 else array.astype(dtype)


def compute_array(array, dtype=None):
    """An array ready for arithmetic: bf16 widened to float32; cast to dtype when one is given."""
    if is_bfloat16(array):
        array = widen_bfloat16(array)
    return array if dtype is None or array.dtype == dtype else array.astype(dtype)
