"""llama2.c checkpoints (.bin): the legacy header (7 int32s, vocab negative when the classifier is not
shared), or the versioned one (magic "ak42", version 1: float32; version 2: int8 with a float32 scale
per group of values, runq.c's "Q8_0"). q and k rows are stored in RoPE's interleaved-pair order and
permuted to HF's on import.

Version 2's matrices are kept as int8: as q8_0 blocks (runtime/quantized.py), each block of 32 taking
its group's scale rounded to float16 (a relative change of at most 2⁻¹¹ per scale, beside int8's own
rounding of up to 1/254 of the group's largest value). Where 32 does not divide the group size or a
row, the values are dequantized to float32 instead (said once)."""
import functools
import os
import struct
import warnings

import numpy as np

from ..config import EMBEDDING, FINAL_NORM, LM_HEAD, ConfigError, LlamaConfig, block_param_name, parameter_shapes
from ..ops import rope
from ..errors import Notice
from ..runtime.quantized import BLOCK, LAYOUTS, Quantized
from .common import LazyTensors, WeightsError

MAGIC = 0x616B3432  # "ak42"
MAGIC_BYTES = struct.pack("<I", MAGIC)  # as export.py writes it: b"24ka"
HEADER_BYTES = 256   # versioned files: magic, version, 7 int32 params, flags, zero padding
LEGACY_HEADER = struct.Struct("<7i")  # dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len
LEGACY_LIMITS = (1 << 16, 1 << 18, 1 << 10, 1 << 10, 1 << 10, 1 << 22, 1 << 24)  # far above any real model
EPS, THETA = 1e-5, 10000.0  # fixed in llama2.c's model.py and run.c


def legacy_header(head):
    """The 7 sizes of a legacy llama2.c header at the start of head (vocab_size negative when the
    classifier is not shared), or None when they are not plausible sizes of a model: the legacy format
    has no magic number, so this is how it is told from other files."""
    if len(head) < LEGACY_HEADER.size:
        return None
    header = LEGACY_HEADER.unpack(head[:LEGACY_HEADER.size])
    dim, _, _, heads, kv_heads, _, _ = header
    sizes = (*header[:5], abs(header[5]), header[6])
    if not all(0 < size <= limit for size, limit in zip(sizes, LEGACY_LIMITS)):
        return None
    return header if dim % heads == 0 and kv_heads <= heads and heads % kv_heads == 0 else None


def read(path):
    with open(path, "rb") as file:
        head = file.read(HEADER_BYTES)
    if head[:4] != MAGIC_BYTES:
        header = legacy_header(head)
        if header is None:
            raise WeightsError(f"{path}: not a llama2.c checkpoint (neither the magic 'ak42' nor a legacy "
                               "header of 7 model sizes)")
        *sizes, vocab, context = header
        return _model(path, *sizes, abs(vocab), context, shared=vocab > 0, offset=LEGACY_HEADER.size,
                      version="legacy")
    if len(head) < HEADER_BYTES:
        raise WeightsError(f"{path} is a llama2.c checkpoint cut short: its header needs {HEADER_BYTES} bytes, "
                           f"the file has {len(head)}")
    version, *sizes = struct.unpack("<i7i", head[4:36])
    shared = bool(head[36])
    if version == 1:
        return _model(path, *sizes, shared=shared, offset=HEADER_BYTES, version="v1")
    if version == 2:
        (group,) = struct.unpack("<i", head[37:41])
        return _model(path, *sizes, shared=shared, offset=HEADER_BYTES, version="v2", group=group)
    raise WeightsError(f"{path}: llama2.c format version {version} is not supported (versions 0, 1 and 2 are)")


def _model(path, dim, hidden, layers, heads, kv_heads, vocab, context, shared, offset, version, group=None):
    try:
        config = LlamaConfig(vocab_size=vocab, hidden_size=dim, intermediate_size=hidden, num_hidden_layers=layers,
                             num_attention_heads=heads, num_key_value_heads=kv_heads, rms_norm_eps=EPS,
                             rope_theta=THETA, max_position_embeddings=context, tie_word_embeddings=shared)
    except ConfigError as error:
        raise WeightsError(f"{path}: {error}") from None
    layout = _Layout(path, offset)
    shapes = parameter_shapes(config)
    per_layer = lambda short: [block_param_name(i, short) for i in range(layers)]  # noqa: E731
    norms = per_layer("input_layernorm") + per_layer("post_attention_layernorm") + [FINAL_NORM]
    matrices = [name for short in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj")
                for name in per_layer(short)]
    head = [] if shared else [LM_HEAD]
    if version == "legacy":
        order = [EMBEDDING]
        for short in ("input_layernorm", "q_proj", "k_proj", "v_proj", "o_proj", "post_attention_layernorm",
                      "gate_proj", "down_proj", "up_proj"):
            order += per_layer(short)
        layout.floats(order + [FINAL_NORM], shapes)
        layout.skip(4 * context * (dim // heads))  # RoPE tables: npllama computes its own
        layout.floats(head, shapes)
    elif version == "v1":
        layout.floats(norms + [EMBEDDING] + matrices + head, shapes)
    else:
        layout.floats(norms, shapes)
        layout.quantized([EMBEDDING] + matrices + head, shapes, group)
    _check_size(path, layout.offset, f"dim {dim}, hidden {hidden}, {layers} layers, {heads} heads, "
                f"{kv_heads} key/value heads, vocabulary {vocab}, context {context}")
    if layout.widened:
        warnings.warn(f"{path}: group size {group} is not a multiple of {BLOCK}: its int8 matrices are "
                      "dequantized to float32", Notice)
    params = LazyTensors()
    for name, (dtype, shape, make) in layout.tensors.items():
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            params.add(name, dtype, shape, lambda make=make: make(head_dim=config.head_dim))
        else:
            params.add(name, dtype, shape, make)
    return config, params, None


def _check_size(path, needed, header):
    """The file must end where its last tensor does; `header` describes the sizes that say where."""
    size = os.path.getsize(path)
    if size < needed:
        raise WeightsError(f"{path} is a llama2.c checkpoint cut short: its header ({header}) needs "
                           f"{needed:,} bytes, the file has {size:,}")
    if size > needed:
        raise WeightsError(f"{path}: its llama2.c header ({header}) calls for {needed:,} bytes, but the file has "
                           f"{size:,}: not a llama2.c checkpoint, or a damaged one")


class _Layout:
    """Where a llama2.c file's tensors lie, walked in the file's order from the header alone (so the
    file's size is checked before anything is read). Each tensor is mapped from the file when read
    (float32), or made q8_0 blocks (int8 with one float32 scale per `group` values: module docstring).
    make(head_dim=None) gives the tensor; with a head size, its rows put from RoPE's paired order in
    HF's (rope.from_pairs)."""

    def __init__(self, path, offset):
        self.path, self.offset = path, offset
        self.tensors = {}  # name -> (dtype, shape, make)
        self.widened = False  # some int8 matrix is dequantized to float32

    def _take(self, dtype, count):
        """A maker of the next count values of dtype, mapped from the file."""
        offset, self.offset = self.offset, self.offset + count * np.dtype(dtype).itemsize
        return lambda: np.memmap(self.path, dtype=dtype, mode="r", offset=offset, shape=(count,))

    def skip(self, nbytes):
        self.offset += nbytes

    def floats(self, names, shapes):
        for name in names:
            values = self._take("<f4", int(np.prod(shapes[name])))
            self.tensors[name] = (np.float32, shapes[name], lambda head_dim=None, v=values, shape=shapes[name]:
                                  _in_hf_order(v().reshape(shape), head_dim))

    def quantized(self, names, shapes, group):
        """Each tensor's int8 values, then its scales (as run.c's successor runq.c reads them)."""
        for name in names:
            shape = shapes[name]
            count = int(np.prod(shape))
            if group < 1 or count % group:
                raise WeightsError(f"{self.path}: group size {group} does not divide tensor {name}")
            values, scales = self._take("i1", count), self._take("<f4", count // group)
            if group % BLOCK == 0 and shape[1] % BLOCK == 0:
                make = functools.cache(lambda head_dim=None, q=values, s=scales, shape=shape:
                                       _blocks(q(), s(), group, shape, head_dim))
                self.tensors[name] = ("q8_0", shape, make)
            else:
                self.widened = True
                self.tensors[name] = (np.float32, shape, lambda head_dim=None, q=values, s=scales, shape=shape:
                                      _in_hf_order((q().reshape(-1, group) * s()[:, None]).reshape(shape), head_dim))


def _in_hf_order(array, head_dim):
    return array if head_dim is None else array[rope.half_order(len(array), head_dim)]


def _blocks(values, scales, group, shape, head_dim):
    """q8_0 blocks of int8 values with a float32 scale per group (group a multiple of 32): the values as
    they are, each block's scale its group's, as float16."""
    out, width = shape
    blocks = np.empty((out, width // BLOCK), LAYOUTS["q8_0"])
    blocks["qs"] = values.reshape(out, width // BLOCK, BLOCK)
    blocks["d"] = np.repeat(scales, group // BLOCK).reshape(out, width // BLOCK)
    return Quantized.from_blocks("q8_0", _in_hf_order(blocks, head_dim))
