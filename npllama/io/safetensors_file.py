"""The safetensors format, read by memory map and written by streaming, without a framework.

Layout (https://github.com/huggingface/safetensors):
    8 bytes        N, little-endian unsigned: the header's length
    N bytes        JSON: {"__metadata__": {str: str}, NAME: {"dtype": "F32", "shape": [...],
                   "data_offsets": [begin, end]}, ...}; offsets count from the end of the header
    the rest       the tensors' bytes, little-endian, C order
Reading maps the file once and views each tensor in place, so a 13.5 GB file costs no memory until
its pages are touched. Writing streams one tensor at a time to a temporary file beside the target,
then renames it: an interrupted write never leaves a half-written file under the target's name.
A quantized weight (runtime/quantized.py) is written as its bytes (Quantized.data): a U8 tensor of shape
(in / 32, out × block bytes), a block column per row; what it was is the writer's to record (the npllama
weights file's metadata does).
"""
import json
import os
import struct

import numpy as np

from .. import dtypes
from ..errors import UserError
from ..runtime.quantized import Quantized, stored_shape
from . import files

MAX_HEADER_BYTES = 100 << 20  # the reference implementation's limit too
CODES = {dtype: code for code, dtype in dtypes.SAFETENSORS_CODES.items()}


class SafetensorsError(UserError):
    """A file that is not a readable safetensors file (message is one line, names the file)."""


def read(path):
    """(metadata: dict[str, str], tensors: dict[str, read-only memory-mapped array]) of a file."""
    header, data_start = _read_header(path)
    metadata = header.pop("__metadata__", None) or {}
    entries = {name: _check_entry(path, name, entry) for name, entry in header.items()}
    size = os.path.getsize(path)
    needed = data_start + max((end for _, _, (_, end) in entries.values()), default=0)
    if needed > size:
        raise SafetensorsError(f"{path} is a safetensors file cut short: its header and tensors need {needed:,} "
                               f"bytes, the file has {size:,}")
    raw = np.memmap(path, dtype=np.uint8, mode="r") if size > data_start else np.zeros(0, np.uint8)
    return metadata, {name: raw[data_start + begin:data_start + end].view(dtype).reshape(shape)
                      for name, (dtype, shape, (begin, end)) in entries.items()}


def _read_header(path):
    size = os.path.getsize(path)
    with open(path, "rb") as file:
        prefix = file.read(8)
        if len(prefix) < 8:
            raise SafetensorsError(f"{path}: not a safetensors file (only {len(prefix)} bytes)")
        (length,) = struct.unpack("<Q", prefix)
        if length > MAX_HEADER_BYTES:
            raise SafetensorsError(f"{path}: not a safetensors file (its first 8 bytes give a header of "
                                   f"{length:,} bytes, more than the {MAX_HEADER_BYTES:,} one may have)")
        if 8 + length > size:
            raise SafetensorsError(f"{path} is a safetensors file cut short: its header needs {8 + length:,} "
                                   f"bytes, the file has {size:,}")
        text = file.read(length)
    try:
        header = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SafetensorsError(f"{path}: not a safetensors file (header is not JSON: {error})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: not a safetensors file (header is not a JSON object)")
    return header, 8 + length


def _check_entry(path, name, entry):
    try:
        dtype = dtypes.SAFETENSORS_CODES[entry["dtype"]]
        shape = tuple(int(n) for n in entry["shape"])
        begin, end = (int(n) for n in entry["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise SafetensorsError(f"{path}: tensor {name}: unsupported or malformed entry {entry!r}") from None
    if end - begin != dtype.itemsize * int(np.prod(shape)) or begin < 0:
        raise SafetensorsError(f"{path}: tensor {name}: {end - begin} bytes do not hold shape {shape}")
    return dtype, shape, (begin, end)


def write(path, tensors, metadata=None):
    """Write tensors (name -> host array, or any mapping that yields them one at a time) and metadata
    (str -> str) to path, atomically. The tensors are written in the mapping's order."""
    entries, offset = {}, 0
    shapes = {}
    for name in tensors:
        shapes[name] = dtype_and_shape(tensors, name)
        dtype, shape = _stored(*shapes[name])
        nbytes = dtype.itemsize * int(np.prod(shape))
        entries[name] = {"dtype": CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header = json.dumps({"__metadata__": dict(metadata or {}), **entries}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # tensors start 8-byte aligned
    files.write_atomically(path, _blocks(header, tensors, shapes))


def _blocks(header, tensors, shapes):
    """The file's bytes, one tensor at a time (a lazy mapping makes each only now)."""
    yield struct.pack("<Q", len(header)) + header
    for name, expected in shapes.items():
        value = tensors[name]
        if _dtype_and_shape(value) != expected:
            raise ValueError(f"tensor {name} is {_dtype_and_shape(value)}, announced as {expected}")
        array = np.ascontiguousarray(value.data if isinstance(value, Quantized) else value)
        yield memoryview(array.reshape(-1).view(np.uint8))


def _stored(dtype, shape):
    """The dtype and shape a tensor of that storage type and shape has in the file: a block type's as bytes."""
    if not dtypes.is_quantized(dtype):
        return dtype, shape
    return np.dtype(np.uint8), stored_shape(dtype, shape)


def dtype_and_shape(tensors, name):
    """A tensor's storage type (dtypes.resolve's: a dtype, or a block type for a Quantized weight) and
    shape, without making it when the mapping can tell (a `describe` method)."""
    describe = getattr(tensors, "describe", None)
    if describe is not None:
        return describe(name)
    return _dtype_and_shape(tensors[name])


def _dtype_and_shape(value):
    if isinstance(value, Quantized):
        return value.kind, tuple(value.shape)
    return dtypes.resolve(value.dtype), tuple(value.shape)
