"""GGUF, llama.cpp's file format: read into (config, params, tokenizer) and written back. The `gguf`
package (gguf-py, llama.cpp's own Python code; imported when used, as it takes a third of a second to
import) gives the types, the block sizes, the dequantization and the writer. The header is parsed here:
gguf-py's GGUFReader makes a NumPy array per element of every metadata array, 4.8 s for a SmolLM-sized
vocabulary (49,152 tokens and merges) and about 20 s for Llama 3's, where this reader takes a fraction
of a second (tests/test_gguf.py checks that it reads every fixture as GGUFReader does).

Layout (ggml's docs/gguf.md), little-endian:
    header        "GGUF", version 3, tensor count, metadata count
    metadata      typed key -> value: general.architecture "llama", llama.embedding_length,
                  llama.attention.head_count, ..., tokenizer.ggml.tokens, ...
    tensor infos  name, dims, ggml type, offset. Dims are listed fastest-varying first (ggml's ne0, ne1):
                  a (out, in) matrix has ne = [in, out], NumPy's shape reversed.
    tensor data   each tensor aligned (32 bytes unless general.alignment says otherwise), row after row;
                  a quantized row is a run of blocks, e.g. Q8_0: an fp16 scale d and 32 int8 q, w = d·q;
                  Q4_K: 256-value super-blocks of 8 sub-blocks, w = d·scⱼ·q − dmin·mⱼ.
Tensor names (llama.cpp's converter, convert_hf_to_gguf.py -> HF's, config.py):
    token_embd -> model.embed_tokens, output_norm -> model.norm, output -> lm_head (absent: tied),
    blk.N.attn_norm, attn_q/k/v/output, ffn_norm, ffn_gate/up/down -> model.layers.N.input_layernorm,
    self_attn.q/k/v/o_proj, post_attention_layernorm, mlp.gate/up/down_proj; rope_freqs (RoPE scaling).

q and k rows. llama.cpp's Llama rotates adjacent features (x₂ᵢ, x₂ᵢ₊₁) of a head, HF rotates
(xᵢ, xᵢ₊hd/2), so the converter reorders the rows of q (n = n_head heads) and k (n = n_head_kv):
    permute(W) = W.reshape(n, 2, hd/2, in).swapaxes(1, 2).reshape(n·hd, in)
    GGUF row h·hd + 2i + s = HF row h·hd + s·hd/2 + i          (head h, i < hd/2, s ∈ {0, 1})
That is rope.to_pairs, which counts heads as rows/hd (n_head for q, n_head_kv for k): export applies it,
read its inverse rope.from_pairs.

Quantized tensors. Q8_0, Q4_0 and Q4_1 are kept as blocks: runtime/quantized.py's, whose bytes are laid
out anew when read (by block column, the scales as float32: a copy of the tensor's bytes, and q and k
rows reordered). The other types
npllama reads (Q5_0, Q5_1 and the K-quants Q2_K … Q6_K) are dequantized with gguf-py once, when read,
and quantized again to Q8_0: x̂ = d·round(w/d), d = max|w|/127 per 32 values. That adds at most d/2 to
each value (plus d's fp16 rounding, 2⁻¹¹·d per unit of q): on the Q4_K and Q6_K tensors of llama.cpp's
quantization of random weights it adds 0.53% of their RMS (relative RMS of x̂ − w: tests/test_quantized_io.py).

RoPE scaling. llama.rope.scaling.type "linear" with llama.rope.scaling.factor f divides every θᵢ by f.
For Llama 3.1's scaling the converter writes no keys but a tensor rope_freqs of divisors, and llama.cpp
rotates by θᵢ / rope_freqs[i]: 1 at short wavelengths, the factor f at long ones, and between them
(ops/rope.py's llama3 rule)
    1/divisorᵢ = 1/f + sᵢ·(1 − 1/f),   sᵢ = old/(2π(high − low))·θᵢ − low/(high − low)
a line in θᵢ. Fitting it gives low/old and high/old; old is llama.rope.scaling.original_context_length
when the file has it, else 8192 (the converter's default, Llama 3.1's and 3.2's value).
"""
import functools
import math
import mmap
import os
import re
import struct
from typing import NamedTuple

import numpy as np

from .. import dtypes
from ..config import EMBEDDING, FINAL_NORM, LM_HEAD, ConfigError, LlamaConfig, block_param_name, parameter_shapes
from ..errors import UserError
from ..ops import rope
from ..runtime.quantized import Quantized, quantize
from . import files, tokenizer_gguf
from .common import LazyTensors, WeightsError, host_floats

ARCHITECTURE = "llama"
TOP_NAMES = {"token_embd.weight": EMBEDDING, "output_norm.weight": FINAL_NORM, "output.weight": LM_HEAD}
BLOCK_NAMES = {"attn_norm": "input_layernorm", "attn_q": "q_proj", "attn_k": "k_proj", "attn_v": "v_proj",
               "attn_output": "o_proj", "ffn_norm": "post_attention_layernorm", "ffn_gate": "gate_proj",
               "ffn_up": "up_proj", "ffn_down": "down_proj"}
ROPE_FREQS = "rope_freqs.weight"
KEPT_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")  # as stored (the floats memory-mapped)
CONVERTED_TYPES = ("Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")  # made Q8_0 when read
EXPORT_TYPES = {"f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"), "bf16": ("BF16", "MOSTLY_BF16"),
                "q8_0": ("Q8_0", "MOSTLY_Q8_0"), "q4_0": ("Q4_0", "MOSTLY_Q4_0"),
                "q4_1": ("Q4_1", "MOSTLY_Q4_1")}  # --type -> (ggml type of the matrices, general.file_type)
LLAMA3_ORIGINAL_CONTEXT = 8192  # convert_hf_to_gguf's default for original_max_position_embeddings
DIVISOR_RTOL = 1e-5  # the divisors are float32: recomputed ones must agree to about that


# ---- read ---------------------------------------------------------------------------------------------
def read(path):
    """(config, params, tokenizer) of a GGUF file of a Llama: F32/F16/BF16 tensors memory-mapped as stored,
    Q8_0/Q4_0/Q4_1 ones as Quantized weights (their blocks copied), other quantized types made Q8_0 when
    read (module docstring), a quantized vector float32; q/k rows in HF's order."""
    metadata, tensors = read_file(path)
    architecture = metadata.get("general.architecture")
    if architecture != ARCHITECTURE:
        raise WeightsError(f"{path}: architecture {architecture!r} is not supported (npllama runs {ARCHITECTURE!r})")
    config = _config(path, metadata, tensors)
    params = LazyTensors()
    for name, tensor in tensors.items():
        if name != ROPE_FREQS:
            _add_tensor(path, params, _hf_name(path, name), tensor, config.head_dim)
    tokenizer_metadata = {key: value for key, value in metadata.items() if key.startswith("tokenizer.")}
    return config, params, _tokenizer(path, tokenizer_metadata)


class Tensor(NamedTuple):
    name: str
    type: object        # gguf.GGMLQuantizationType
    shape: tuple        # NumPy's order: (out, in) for a matrix (ggml's ne reversed)
    data: np.ndarray    # memory-mapped: F32/F16 as such, BF16 as uint16, a quantized row as its bytes


def read_file(path):
    """(metadata: key -> str, int, float, bool or a list of them; tensors: name -> Tensor) of a GGUF file.
    WeightsError for a file that is not GGUF, truncated or corrupt."""
    import gguf
    data = np.memmap(path, dtype=np.uint8, mode="r")
    try:
        return _parse(path, data, gguf)
    except (ValueError, KeyError, IndexError, OverflowError, struct.error) as error:
        raise WeightsError(f"{path}: not a readable GGUF file, truncated or corrupt ({error})") from None


def _parse(path, data, gguf):
    """ggml's docs/gguf.md: "GGUF", version, tensor count, metadata count; the metadata (key, type, value);
    the tensor infos (name, dims fastest first, ggml type, offset); the data, from an aligned start."""
    cursor = _Cursor(data)
    magic, version = cursor.unpack("<4sI")
    if magic != b"GGUF":
        raise ValueError(f"its first bytes are {magic!r}, not b'GGUF'")
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version}; npllama reads versions 2 and 3")
    tensor_count, metadata_count = cursor.unpack("<QQ")
    metadata = {}
    for _ in range(metadata_count):
        key = cursor.string()
        metadata[key] = cursor.value(gguf.GGUFValueType(cursor.unpack("<I")[0]))
    infos = []
    for _ in range(tensor_count):
        name = cursor.string()
        dims = cursor.unpack(f"<{cursor.unpack('<I')[0]}Q")
        kind, offset = cursor.unpack("<IQ")
        infos.append((name, dims, gguf.GGMLQuantizationType(kind), offset))
    alignment = metadata.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT)
    if isinstance(alignment, bool) or not isinstance(alignment, int) or alignment < 1 or alignment & (alignment - 1):
        raise ValueError(f"general.alignment is {alignment!r}, not a power of two")
    start = -(-cursor.position // alignment) * alignment
    tensors = {}
    for name, dims, kind, offset in infos:
        if name in tensors:
            raise ValueError(f"tensor {name} appears twice")
        tensors[name] = _tensor(data, name, dims, kind, start + offset, gguf)
    return metadata, tensors


def _tensor(data, name, dims, kind, begin, gguf):
    shape = tuple(int(n) for n in reversed(dims))
    block, type_size = gguf.GGML_QUANT_SIZES[kind]
    if shape and shape[-1] % block:
        raise ValueError(f"tensor {name}: rows of {shape[-1]} values do not divide into {kind.name}'s blocks of {block}")
    end = begin + int(np.prod(shape)) // block * type_size
    if end > data.size:
        raise ValueError(f"tensor {name} ends at byte {end:,} but the file has {data.size:,}")
    stored = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}.get(kind.name)
    if stored is None:  # quantized (or a type read() refuses): each row as its bytes
        return Tensor(name, kind, shape, data[begin:end].reshape(*shape[:-1], shape[-1] // block * type_size))
    return Tensor(name, kind, shape, data[begin:end].view(stored).reshape(shape))


class _Cursor:
    """Reads GGUF's little-endian values one after the other from a byte array."""
    SCALARS = {"UINT8": "B", "INT8": "b", "UINT16": "H", "INT16": "h", "UINT32": "I", "INT32": "i",
               "FLOAT32": "f", "BOOL": "?", "UINT64": "Q", "INT64": "q", "FLOAT64": "d"}

    def __init__(self, data):
        self.data, self.position = memoryview(data), 0  # a memoryview slices faster than an array

    def unpack(self, layout):
        return struct.unpack(layout, self._take(struct.calcsize(layout)))

    def _take(self, size):
        if self.position + size > len(self.data):
            raise ValueError(f"the file ends at byte {len(self.data):,}, inside its header")
        chunk = self.data[self.position:self.position + size]
        self.position += size
        return chunk

    def string(self):
        return str(self._take(self.unpack("<Q")[0]), "utf-8")

    def value(self, kind):
        if kind.name == "STRING":
            return self.string()
        if kind.name != "ARRAY":
            return self.unpack("<" + self.SCALARS[kind.name])[0]
        element, count = self.unpack("<IQ")
        element = type(kind)(element)
        if element.name in ("STRING", "ARRAY"):
            if count > len(self.data) - self.position:  # each takes at least a byte: a corrupt count fails now
                raise ValueError(f"an array of {count:,} values cannot fit in the rest of the file")
            return [self.value(element) for _ in range(count)]
        layout = "<" + self.SCALARS[element.name]
        values = np.frombuffer(self._take(count * struct.calcsize(layout)), dtype=np.dtype(layout))
        return values.tolist()


def _config(path, metadata, tensors):
    def get(key, default=None, convert=int):
        value = metadata.get(f"{ARCHITECTURE}.{key}", default)
        if value is None:
            raise WeightsError(f"{path}: missing metadata {ARCHITECTURE}.{key}")
        if isinstance(value, list):  # llama.cpp allows a value per layer; npllama's layers are all alike
            if len(set(value)) != 1:
                raise WeightsError(f"{path}: {ARCHITECTURE}.{key} differs between layers ({value}); "
                                   "npllama's layers all have one shape")
            value = value[0]
        return convert(value)

    hidden, heads = get("embedding_length"), get("attention.head_count")
    head_dim = hidden // heads
    for key in ("attention.key_length", "attention.value_length", "rope.dimension_count"):
        if (width := get(key, head_dim)) != head_dim:
            raise WeightsError(f"{path}: {ARCHITECTURE}.{key} is {width}, not embedding_length / head_count "
                               f"= {head_dim}; npllama's heads are hidden_size / num_attention_heads wide")
    theta = get("rope.freq_base", 10000.0, _float32)
    embedding = tensors.get("token_embd.weight")
    vocab = metadata.get(f"{ARCHITECTURE}.vocab_size") or len(metadata.get("tokenizer.ggml.tokens", ())) or \
        (embedding.shape[0] if embedding is not None else None)
    try:
        return LlamaConfig(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=get("feed_forward_length"),
            num_hidden_layers=get("block_count"), num_attention_heads=heads,
            num_key_value_heads=get("attention.head_count_kv", heads),
            rms_norm_eps=get("attention.layer_norm_rms_epsilon", convert=_float32), rope_theta=theta,
            rope_scaling=_rope_scaling(path, metadata, tensors.get(ROPE_FREQS), head_dim, theta),
            max_position_embeddings=get("context_length"),
            tie_word_embeddings="output.weight" not in tensors)
    except ConfigError as error:
        raise WeightsError(f"{path}: {error}") from None


def _float32(value):
    """A float32 metadata value as the shortest decimal that rounds to it: 1e-05, not 9.99999974e-06,
    as the config it was converted from wrote it."""
    return float(str(np.float32(value)))


def _rope_scaling(path, metadata, rope_freqs, head_dim, theta):
    """config.rope_scaling from llama.cpp's keys (whose defaults it follows: type "linear", factor 1 when
    absent) or from a rope_freqs tensor."""
    kind = metadata.get(f"{ARCHITECTURE}.rope.scaling.type", "linear")
    factor = metadata.get(f"{ARCHITECTURE}.rope.scaling.factor") or metadata.get(f"{ARCHITECTURE}.rope.scale_linear")
    if kind not in ("none", "linear"):
        raise WeightsError(f"{path}: RoPE scaling {kind!r} is not supported (npllama has linear and llama3)")
    linear = {"rope_type": "linear", "factor": _float32(factor)} if kind == "linear" and factor not in (None, 0, 1) \
        else None
    if rope_freqs is None:
        return linear
    if linear is not None:
        raise WeightsError(f"{path}: both a linear RoPE scaling factor and a rope_freqs tensor; npllama has one or the other")
    divisors = _dequantize(rope_freqs).astype(np.float64).reshape(-1)
    if divisors.shape != (head_dim // 2,):
        raise WeightsError(f"{path}: rope_freqs has {divisors.size} values, the heads need {head_dim // 2}")
    original = int(metadata.get(f"{ARCHITECTURE}.rope.scaling.original_context_length", LLAMA3_ORIGINAL_CONTEXT))
    return _llama3_scaling(path, divisors, head_dim, theta, original)


def _llama3_scaling(path, divisors, head_dim, theta, original):
    """The llama3 rope_scaling whose frequencies are θᵢ / divisorsᵢ (module docstring), checked."""
    if np.allclose(divisors, 1, rtol=0, atol=DIVISOR_RTOL):
        return None
    inv_freq = rope.inverse_frequencies(head_dim, theta)
    factor = float(divisors.max())  # the longest wavelengths are divided by the whole factor
    in_band = (divisors > 1 + DIVISOR_RTOL) & (divisors < factor * (1 - DIVISOR_RTOL))
    if in_band.sum() < 2:
        raise WeightsError(f"{path}: rope_freqs has {in_band.sum()} frequencies between its unscaled and fully "
                           "scaled ends; llama3's low/high_freq_factor need at least 2 to be recovered")
    smooth = (1 / divisors[in_band] - 1 / factor) / (1 - 1 / factor)
    slope, intercept = np.polyfit(inv_freq[in_band], smooth, 1)
    width = original / (2 * math.pi * slope)  # high_freq_factor − low_freq_factor
    low = -intercept * width
    scaling = {"rope_type": "llama3", "factor": _round(factor), "low_freq_factor": _round(low),
               "high_freq_factor": _round(low + width), "original_max_position_embeddings": original}
    with np.errstate(divide="ignore", invalid="ignore"):  # a file off llama3's rule may fit to nonsense
        recomputed = inv_freq / rope.inverse_frequencies(head_dim, theta, scaling)
    if not np.allclose(recomputed, divisors, rtol=DIVISOR_RTOL, atol=0):
        raise WeightsError(f"{path}: rope_freqs does not follow llama3's RoPE scaling (the nearest, {scaling}, "
                           "gives other frequencies)")
    return scaling


def _round(value):
    """6 significant digits: the float32 divisors carry about 7, so 4.0 comes back as 4.0, not 3.9999998."""
    return float(f"{value:.6g}")


def _hf_name(path, name):
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", name)
    if name in TOP_NAMES:
        return TOP_NAMES[name]
    if match and match.group(2) in BLOCK_NAMES:
        return block_param_name(int(match.group(1)), BLOCK_NAMES[match.group(2)])
    raise WeightsError(f"{path}: tensor {name} is not part of the Llama npllama runs (biases, experts or "
                       "another variant)")


def _add_tensor(path, params, name, tensor, head_dim):
    """params[name] made when read (module docstring), q/k rows back in HF's order."""
    kind = tensor.type.name
    if kind not in KEPT_TYPES + CONVERTED_TYPES:
        raise WeightsError(f"{path}: tensor {tensor.name} has type {kind}, which npllama cannot read (it reads "
                           f"{', '.join(KEPT_TYPES + CONVERTED_TYPES)})")
    permute = name.endswith(("q_proj.weight", "k_proj.weight"))
    stored = {"F32": np.float32, "F16": np.float16, "BF16": dtypes.BFLOAT16}.get(kind)
    if stored is not None:
        params.add(name, stored, tensor.shape, lambda: _in_hf_order(tensor.data.view(stored), head_dim, permute))
    elif len(tensor.shape) != 2:
        params.add(name, np.float32, tensor.shape, lambda: _dequantize(tensor))
    elif kind in KEPT_TYPES:  # blocks are laid out (or converted) once, then kept: a decoder reads them every token
        params.add(name, kind.lower(), tensor.shape, _copied_once(tensor, lambda: Quantized.from_bytes(
            kind.lower(), _in_hf_order(tensor.data, head_dim, permute), tensor.shape)))
    else:
        params.add(name, "q8_0", tensor.shape, _copied_once(tensor, lambda: quantize(
            _in_hf_order(_dequantize(tensor), head_dim, permute), "q8_0")))


def _copied_once(tensor, make):
    """make, called once (then kept), after which the tensor's pages of the mapped file are handed back:
    its bytes are copied into the weight, and otherwise they would count in the process's memory for as
    long as the file is mapped (a 7B Q8_0 file peaked at 13.9 GiB instead of 7.2)."""
    @functools.cache
    def made():
        weight = make()
        _release(tensor.data)
        return weight
    return made


def _release(array):
    """madvise(MADV_DONTNEED) on the whole pages of a memory-mapped array: they leave this process's
    resident memory (they stay in the page cache; reading them again maps them again)."""
    mapped = array
    while mapped is not None and getattr(mapped, "_mmap", None) is None:  # np.memmap views carry the mapping
        mapped = mapped.base
    if mapped is None or not hasattr(mmap, "MADV_DONTNEED"):  # not mapped, or no madvise here (Windows)
        return
    start = array.ctypes.data - np.frombuffer(mapped._mmap, dtype=np.uint8).ctypes.data
    first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
    end = (start + array.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if end > first:
        mapped._mmap.madvise(mmap.MADV_DONTNEED, first, end - first)


def _dequantize(tensor):
    import gguf
    return gguf.quants.dequantize(tensor.data, tensor.type)


def _in_hf_order(array, head_dim, permute):
    return rope.from_pairs(array, head_dim) if permute else array


def _tokenizer(path, metadata):
    try:
        return tokenizer_gguf.read(metadata)
    except UserError as error:
        raise WeightsError(f"{path}: {error}") from None


# ---- export -------------------------------------------------------------------------------------------
def export(path, config, params, tokenizer=None, quant_type="f16", on_tensor=lambda done, total: None):
    """Write a GGUF file llama.cpp runs, as convert_hf_to_gguf.py would from the same HF checkpoint: its
    metadata, names and q/k order; matrices in quant_type ('f32', 'f16', 'bf16', 'q8_0', 'q4_0' or 'q4_1',
    quantized by gguf-py, llama.cpp's reference; a matrix whose rows the blocks do not divide falls back to
    F16, as the converter does; a weight already in quant_type's blocks is written as it is), norms and
    rope_freqs in F32.
    Tensors are made and written one at a time (on_tensor(done, total) after each), to a temporary file
    renamed to path at the end."""
    import gguf
    if quant_type not in EXPORT_TYPES:
        raise WeightsError(f"{path}: GGUF type {quant_type!r} is not one npllama writes ({', '.join(EXPORT_TYPES)})")
    tokenizer_fields = tokenizer_gguf.fields(tokenizer) if tokenizer is not None else {}  # first: it may refuse
    plan = _tensor_plan(config, params, gguf.GGMLQuantizationType[EXPORT_TYPES[quant_type][0]])
    with files.replacing(path) as temporary:
        writer = gguf.GGUFWriter(temporary, ARCHITECTURE)
        _write_metadata(writer, config, path, gguf.LlamaFileType[EXPORT_TYPES[quant_type][1]], tokenizer_fields)
        for name, shape, qtype, _ in plan:  # the infos first, then each tensor as it is made
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            writer.add_tensor_info(name, shape, np.dtype(np.float32), int(np.prod(shape)) // block * type_size,
                                   raw_dtype=qtype)  # (a uint8 dtype would mean shape counts bytes)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for done, (_, _, _, make) in enumerate(plan, start=1):
            writer.write_tensor_data(make())
            on_tensor(done, len(plan))
        writer.close()


def _tensor_plan(config, params, matrix_type):
    """[(GGUF name, shape, ggml type, make the data to write)] in the converter's order: rope_freqs first."""
    import gguf
    gguf_names = {hf: gguf_name for gguf_name, hf in TOP_NAMES.items()}
    for layer in range(config.num_hidden_layers):
        for gguf_short, short in BLOCK_NAMES.items():
            gguf_names[block_param_name(layer, short)] = f"blk.{layer}.{gguf_short}.weight"
    plan = []
    divisors = _rope_divisors(config)
    if divisors is not None:
        plan.append((ROPE_FREQS, divisors.shape, gguf.GGMLQuantizationType.F32, lambda: divisors))
    for name, shape in parameter_shapes(config).items():
        qtype = matrix_type if len(shape) == 2 else gguf.GGMLQuantizationType.F32  # norms stay F32
        if shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
            qtype = gguf.GGMLQuantizationType.F16
        permute = name.endswith(("q_proj.weight", "k_proj.weight"))
        plan.append((gguf_names[name], shape, qtype, lambda name=name, qtype=qtype, permute=permute: _gguf_data(
            params[name], qtype, config.head_dim, permute)))
    return plan


def _gguf_data(value, qtype, head_dim, permute):
    """A weight as GGUF stores it in qtype, in llama.cpp's row order: a Quantized weight of that very type
    as its bytes, unchanged; anything else quantized by gguf-py from its float32 values (a Quantized
    weight of another type dequantized first)."""
    import gguf
    if isinstance(value, Quantized) and value.kind == qtype.name.lower():
        return _in_gguf_order(np.ascontiguousarray(value.blocks).view(np.uint8), head_dim, permute)
    return gguf.quants.quantize(_in_gguf_order(host_floats(value, np.float32), head_dim, permute), qtype)


def _in_gguf_order(array, head_dim, permute):
    return np.ascontiguousarray(rope.to_pairs(array, head_dim) if permute else array)


def _rope_divisors(config):
    """llama3 scaling as llama.cpp's rope_freqs: θᵢ / θ'ᵢ in float32 (None for other scalings)."""
    scaling = config.rope_scaling or {}
    if scaling.get("rope_type", scaling.get("type")) != "llama3":
        return None
    unscaled = rope.inverse_frequencies(config.head_dim, config.rope_theta)
    return (unscaled / rope.inverse_frequencies(config.head_dim, config.rope_theta, scaling)).astype(np.float32)


def _write_metadata(writer, config, path, file_type, tokenizer_fields):
    """The keys convert_hf_to_gguf writes for a Llama (TextModel and LlamaModel.set_gguf_parameters)."""
    import gguf
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(os.path.splitext(os.path.basename(path))[0])
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_file_type(file_type)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_key_length(config.head_dim)  # as the converter does from a config.json with head_dim (HF's now)
    writer.add_value_length(config.head_dim)
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(scaling["factor"])
    elif kind == "llama3":  # the divisors are the rope_freqs tensor; this key lets read() recover the context
        writer.add_rope_scaling_orig_ctx_len(scaling["original_max_position_embeddings"])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value in tokenizer_fields.items():
        if value != []:  # gguf-py writes no empty array; llama.cpp reads an absent one the same
            writer.add_key_value(key, value, _value_type(key, value, gguf.GGUFValueType))


def _value_type(key, value, types):
    """The GGUF type of a tokenizer field by its Python type: str, bool, int (UINT32), float (FLOAT32), or a
    list of one of str, int, float (gguf-py types the elements the same way: STRING, INT32, FLOAT32)."""
    scalar = {str: types.STRING, bool: types.BOOL, int: types.UINT32, float: types.FLOAT32}
    if type(value) in scalar:
        return scalar[type(value)]
    if isinstance(value, list) and len({type(v) for v in value}) == 1 and type(value[0]) in (str, int, float):
        return types.ARRAY
    raise ValueError(f"tokenizer field {key}: {type(value).__name__} is not a type GGUF metadata holds")
