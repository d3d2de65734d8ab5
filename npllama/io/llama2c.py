"""llama2.c checkpoints (.bin): the legacy header (7 int32s, vocab negative when the classifier is not
shared), or the versioned one (magic "ak42", version 1: float32; version 2: int8 Q8_0, dequantized when
read). q and k rows are stored in RoPE's interleaved-pair order and permuted to HF's on import."""
import os
import struct

import numpy as np

from ..config import EMBEDDING, FINAL_NORM, LM_HEAD, ConfigError, LlamaConfig, block_param_name, parameter_shapes
from ..ops import rope
from .common import LazyTensors, WeightsError

MAGIC = 0x616B3432  # "ak42"
HEADER_BYTES = 256   # versioned files: magic, version, 7 int32 params, flags, zero padding
EPS, THETA = 1e-5, 10000.0  # fixed in llama2.c's model.py and run.c


def legacy_header(path):
    """The 7 header ints of a legacy llama2.c file, or None when the file is not one (its size must
    match the header exactly)."""
    with open(path, "rb") as file:
        head = file.read(28)
    if len(head) < 28:
        return None
    dim, hidden, layers, heads, kv_heads, vocab, context = struct.unpack("<7i", head)
    if min(dim, hidden, layers, heads, kv_heads, abs(vocab), context) <= 0 or dim % heads:
        return None
    expected = 28 + 4 * _float_count(dim, hidden, layers, heads, kv_heads, vocab, context, legacy=True)
    return (dim, hidden, layers, heads, kv_heads, vocab, context) if os.path.getsize(path) == expected else None


def _float_count(dim, hidden, layers, heads, kv_heads, vocab, context, legacy):
    kv_dim = dim // heads * kv_heads
    per_layer = 2 * dim + 2 * dim * dim + 2 * dim * kv_dim + 3 * dim * hidden
    rope_tables = context * (dim // heads) if legacy else 0  # freq_cis real and imaginary halves
    classifier = abs(vocab) * dim if (vocab < 0 if legacy else False) else 0
    return abs(vocab) * dim + layers * per_layer + dim + rope_tables + classifier


def read(path):
    with open(path, "rb") as file:
        head = file.read(HEADER_BYTES)
    if struct.unpack("<I", head[:4])[0] != MAGIC:
        header = legacy_header(path)
        if header is None:
            raise WeightsError(f"{path}: not a llama2.c checkpoint (its size does not match its header)")
        *sizes, vocab, context = header
        return _model(path, *sizes, abs(vocab), context, shared=vocab > 0, offset=28, layout="legacy")
    if len(head) < HEADER_BYTES:
        raise WeightsError(f"{path}: truncated llama2.c header ({len(head)} of {HEADER_BYTES} bytes)")
    version, *sizes = struct.unpack("<i7i", head[4:36])
    shared = bool(head[36])
    if version == 1:
        return _model(path, *sizes, shared=shared, offset=HEADER_BYTES, layout="v1")
    if version == 2:
        (group,) = struct.unpack("<i", head[37:41])
        return _model(path, *sizes, shared=shared, offset=HEADER_BYTES, layout="v2", group=group)
    raise WeightsError(f"{path}: llama2.c format version {version} is not supported (versions 0, 1 and 2 are)")


def _model(path, dim, hidden, layers, heads, kv_heads, vocab, context, shared, offset, layout, group=None):
    try:
        config = LlamaConfig(vocab_size=vocab, hidden_size=dim, intermediate_size=hidden, num_hidden_layers=layers,
                             num_attention_heads=heads, num_key_value_heads=kv_heads, rms_norm_eps=EPS,
                             rope_theta=THETA, max_position_embeddings=context, tie_word_embeddings=shared)
    except ConfigError as error:
        raise WeightsError(f"{path}: {error}") from None
    reader = _Reader(path, offset)
    shapes = parameter_shapes(config)
    per_layer = lambda short: [block_param_name(i, short) for i in range(layers)]  # noqa: E731
    norms = per_layer("input_layernorm") + per_layer("post_attention_layernorm") + [FINAL_NORM]
    matrices = [name for short in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj")
                for name in per_layer(short)]
    head = [] if shared else [LM_HEAD]
    if layout == "legacy":
        order = [EMBEDDING]
        for short in ("input_layernorm", "q_proj", "k_proj", "v_proj", "o_proj", "post_attention_layernorm",
                      "gate_proj", "down_proj", "up_proj"):
            order += per_layer(short)
        reader.floats(order + [FINAL_NORM], shapes)
        reader.skip(4 * context * (dim // heads))  # RoPE tables: npllama computes its own
        reader.floats(head, shapes)
    elif layout == "v1":
        reader.floats(norms + [EMBEDDING] + matrices + head, shapes)
    else:
        reader.floats(norms, shapes)
        reader.quantized([EMBEDDING] + matrices + head, shapes, group)
    reader.check_size()
    params = LazyTensors()
    for name, (dtype, shape, make) in reader.tensors.items():
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            params.add(name, dtype, shape, lambda make=make: rope.from_pairs(make(), config.head_dim))
        else:
            params.add(name, dtype, shape, make)
    return config, params, None


class _Reader:
    """Walks a llama2.c file's tensors in order, mapping each from the file (float32) or
    dequantizing it when read (int8 Q8_0: w = q · scale, one float32 scale per `group` values)."""

    def __init__(self, path, offset):
        self.path, self.offset = path, offset
        self.size = os.path.getsize(path)
        self.tensors = {}

    def _map(self, dtype, count):
        end = self.offset + count * np.dtype(dtype).itemsize
        if end > self.size:
            raise WeightsError(f"{self.path}: truncated: the header calls for at least {end:,} bytes, "
                               f"the file has {self.size:,}")
        array = np.memmap(self.path, dtype=dtype, mode="r", offset=self.offset, shape=(count,))
        self.offset = end
        return array

    def skip(self, nbytes):
        self.offset += nbytes

    def floats(self, names, shapes):
        for name in names:
            array = self._map("<f4", int(np.prod(shapes[name]))).reshape(shapes[name])
            self.tensors[name] = (np.float32, shapes[name], lambda array=array: array)

    def quantized(self, names, shapes, group):
        """Each tensor's int8 values, then its scales (as run.c's successor runq.c reads them)."""
        for name in names:
            count = int(np.prod(shapes[name]))
            if count % group:
                raise WeightsError(f"{self.path}: group size {group} does not divide tensor {name}")
            values, scales = self._map("i1", count), self._map("<f4", count // group)
            self.tensors[name] = (np.float32, shapes[name], lambda q=values, s=scales, shape=shapes[name]:
                                  (q.reshape(-1, group) * s[:, None]).reshape(shape))

    def check_size(self):
        if self.offset != self.size:
            raise WeightsError(f"{self.path}: {self.size - self.offset:+,} bytes more than the header calls for"
                               if self.offset < self.size else f"{self.path}: truncated")
