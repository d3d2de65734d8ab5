"""The npllama weights file, and the checkpoint layouts it is imported from and exported to.

The npllama weights file is one safetensors file (safetensors_file.py):
    tensors      HF transformers' names and layouts (model.py), in the dtype they were saved in
    metadata     "npllama.config":    the config as config.json's JSON
                 "npllama.tokenizer": the tokenizer (tokenizer.to_metadata), absent when there is none
                 "format": "pt", which lets HF's safetensors loader read the tensors too
so `generate --weights FILE` needs no other file. `load` maps it into memory (nothing is read until
used); `save` writes a temporary file and renames it.

Sources `load` reads (`detect` tells them apart):
    npllama file    as above
    HF directory    config.json; model.safetensors, or shards listed in model.safetensors.index.json;
                    tokenizer.model when present
    Meta directory  params.json; consolidated.00.pth (.01, .02 … for 13B and up: model-parallel shards,
                    each tensor split along the axis its layer is parallel on); tokenizer.model
    llama2.c .bin   the legacy header (7 int32s, vocab negative when the classifier is not shared),
                    or the versioned one (magic "ak42", version 1: float32; version 2: int8 Q8_0)
Meta and llama2.c store q and k rows in RoPE's interleaved-pair order; they are permuted to HF's
rotate-half order on import (rope.from_pairs), so the model has one convention everywhere.
Converted tensors are made when read (LazyTensors), one at a time: a 13 GB import never holds
more than a tensor's worth of converted data.
"""
import collections.abc
import json
import os
import re
import struct

import numpy as np

from . import backend, dtypes, files, lora, rope, safetensors_file, tokenizer as tokenizers, torch_pickle
from .config import ConfigError, LlamaConfig, human_count
from .model import EMBEDDING, FINAL_NORM, LM_HEAD, block_param_name, parameter_shapes

FORMAT_VERSION = "1"
CONFIG_KEY, TOKENIZER_KEY, VERSION_KEY = "npllama.config", "npllama.tokenizer", "npllama.version"


class WeightsError(ValueError):
    """A checkpoint that cannot be used (message is one line, names the file, fit for the user)."""


class LazyTensors(collections.abc.Mapping):
    """name -> array, each made when it is read (and not kept): joining shards, permuting rows and
    converting dtypes happen one tensor at a time. dtype and shape are known without making it."""

    def __init__(self):
        self._entries = {}

    def add(self, name, dtype, shape, make):
        self._entries[name] = (dtypes.resolve(dtype), tuple(shape), make)

    def describe(self, name):
        dtype, shape, _ = self._entries[name]
        return dtype, shape

    def __getitem__(self, name):
        return self._entries[name][2]()

    def __iter__(self):
        return iter(self._entries)

    def __len__(self):
        return len(self._entries)


# ---- the npllama weights file ----------------------------------------------------------------------
def save(path, config, params, tokenizer=None, dtype=None, metadata=None):
    """Write the npllama weights file atomically; dtype (e.g. 'fp16') converts tensors, else kept.
    metadata (str -> str) is stored beside the config (training writes its step there)."""
    if tokenizer is not None and tokenizer.vocab_size != config.vocab_size:
        raise WeightsError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but the model's "
                           f"vocab_size is {config.vocab_size}")
    metadata = {**(metadata or {}), "format": "pt", VERSION_KEY: FORMAT_VERSION,
                CONFIG_KEY: json.dumps(config.to_dict())}
    if tokenizer is not None:
        metadata[TOKENIZER_KEY] = tokenizers.to_metadata(tokenizer)
    safetensors_file.write(path, _host_tensors(config, params, dtype), metadata)


def _host_tensors(config, params, dtype=None):
    """The config's tensors, each moved to the host (and converted to dtype) only when it is written."""
    tensors = LazyTensors()
    for name in parameter_shapes(config):
        stored, shape = safetensors_file.dtype_and_shape(params, name)
        tensors.add(name, dtype or stored, shape,
                    lambda name=name: dtypes.convert(backend.to_host(params[name]), dtype or stored))
    return tensors


def load(path, tokenizer_path=None):
    """(config, params, tokenizer) from any source `detect` recognises; tokenizer is None when the
    source has none. tokenizer_path (a SentencePiece .model) replaces or supplies the tokenizer.
    Tensors keep their stored dtype and are memory-mapped where the source allows."""
    kind = detect(path)
    config, params, tokenizer = IMPORTERS[kind](path)
    if tokenizer_path is not None:
        tokenizer = _read_tokenizer(tokenizer_path)
    _check(path, config, params, tokenizer)
    return config, params, tokenizer


def detect(path):
    """Which source path is: 'npllama', 'hf', 'meta' or 'llama2c' (WeightsError when none)."""
    if not os.path.exists(path):
        raise WeightsError(f"{path}: no such file or directory")
    if os.path.isdir(path):
        for marker, kind in (("config.json", "hf"), ("params.json", "meta")):
            if os.path.isfile(os.path.join(path, marker)):
                return kind
        raise WeightsError(f"{path}: unrecognised checkpoint layout: a directory needs config.json "
                           "(HF) or params.json (Meta)")
    with open(path, "rb") as file:
        head = file.read(8)
    if len(head) == 8 and struct.unpack("<I", head[:4])[0] == LLAMA2C_MAGIC:
        return "llama2c"
    if path.endswith(".bin") and _legacy_llama2c_header(path) is not None:
        return "llama2c"
    return "npllama"  # anything else must be a safetensors file; reading it says if it is not


def _read_npllama(path):
    metadata, tensors = _read_safetensors(path)
    if CONFIG_KEY not in metadata:
        raise WeightsError(f"{path}: a safetensors file without an npllama config; for an HF checkpoint "
                           "give its directory (with config.json)")
    if int(metadata.get(VERSION_KEY, FORMAT_VERSION)) > int(FORMAT_VERSION):
        raise WeightsError(f"{path}: written by a newer npllama (format {metadata[VERSION_KEY]}); upgrade npllama")
    config = _config_from_json(path, metadata[CONFIG_KEY])
    tokenizer = tokenizers.from_metadata(metadata[TOKENIZER_KEY]) if TOKENIZER_KEY in metadata else None
    return config, tensors, tokenizer


def _read_safetensors(path):
    try:
        return safetensors_file.read(path)
    except safetensors_file.SafetensorsError as error:
        raise WeightsError(str(error)) from None


def _config_from_json(path, text):
    try:
        return LlamaConfig.from_dict(json.loads(text))
    except json.JSONDecodeError as error:
        raise WeightsError(f"{path}: the config is not valid JSON ({error})") from None
    except ConfigError as error:
        raise WeightsError(f"{path}: {error}") from None


def _read_tokenizer(path):
    try:
        return tokenizers.load(path)
    except OSError as error:
        raise WeightsError(f"{path}: cannot read the tokenizer ({error.strerror})") from None


def _optional_tokenizer(directory):
    path = os.path.join(directory, "tokenizer.model")
    return _read_tokenizer(path) if os.path.isfile(path) else None


def _check(path, config, params, tokenizer):
    """Every tensor the config calls for is present with its shape; the tokenizer fits the vocabulary."""
    for name, shape in parameter_shapes(config).items():
        if name not in params:
            raise WeightsError(f"{path}: missing tensor {name} (the config has {config.num_hidden_layers} "
                               f"layers, {'tied' if config.tie_word_embeddings else 'untied'} embeddings)")
        dtype, found = safetensors_file.dtype_and_shape(params, name)
        if found != shape:
            raise WeightsError(f"{path}: tensor {name} has shape {found}, the config says {shape}")
        if dtype != dtypes.BFLOAT16 and dtype.kind != "f":
            raise WeightsError(f"{path}: tensor {name} has dtype {dtype}, not a floating-point type")
    if tokenizer is not None and tokenizer.vocab_size != config.vocab_size:
        raise WeightsError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but the model's "
                           f"vocab_size is {config.vocab_size}")


def describe(config, params, tokenizer, path=None):
    """A short multi-line summary: parameters, shape, dtype, size on disk, tokenizer."""
    stored = sorted({dtypes.name(safetensors_file.dtype_and_shape(params, name)[0]) for name in params})
    lines = [f"parameters  {config.num_parameters():,} ({human_count(config.num_parameters())})",
             f"layers      {config.num_hidden_layers}, hidden {config.hidden_size}, "
             f"intermediate {config.intermediate_size}, context {config.max_position_embeddings}",
             f"heads       {config.num_attention_heads} query, {config.num_key_value_heads} key/value "
             f"(head dim {config.head_dim})",
             f"vocabulary  {config.vocab_size}, embeddings {'tied' if config.tie_word_embeddings else 'untied'}",
             f"dtype       {', '.join(stored)}",
             f"tokenizer   {tokenizer.describe() if tokenizer else 'none (generate takes token ids)'}"]
    if path is not None:
        lines.append(f"on disk     {_human_bytes(os.path.getsize(path))} ({path})")
    return "\n".join(lines)


def _human_bytes(size):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.4g} {unit}"
        size /= 1024
    return f"{size:.4g} TiB"


# ---- LoRA adapters --------------------------------------------------------------------------------------
ADAPTERS_KEY = "npllama.lora"


def save_adapters(path, adapters, rank, alpha, targets, metadata=None):
    """A small safetensors file of LoRA adapters (lora.adapter_names -> A or B) and, in its metadata,
    their rank, alpha and targets (written atomically)."""
    info = {"rank": rank, "alpha": alpha, "targets": list(targets)}
    safetensors_file.write(path, {name: backend.to_host(value) for name, value in adapters.items()},
                           {**(metadata or {}), ADAPTERS_KEY: json.dumps(info)})


def load_adapters(path, config=None):
    """(adapters: name -> array, info: {"rank", "alpha", "targets"}) from save_adapters' file. Every A
    needs its B; with a config, each pair must fit a projection of that model."""
    if not os.path.isfile(path):
        raise WeightsError(f"{path}: no such file")
    metadata, adapters = _read_safetensors(path)
    try:
        info = json.loads(metadata[ADAPTERS_KEY])
        rank, alpha = int(info["rank"]), float(info["alpha"])
    except (KeyError, TypeError, ValueError):
        raise WeightsError(f"{path}: not an npllama LoRA adapters file") from None
    if rank < 1 or not alpha > 0:
        raise WeightsError(f"{path}: rank {rank} and alpha {alpha} must be positive")
    shapes = parameter_shapes(config) if config is not None else None
    for name in adapters:
        weight, kind = _adapted_weight(path, name)
        name_a, name_b = lora.adapter_names(weight)
        if name_a not in adapters or name_b not in adapters:
            raise WeightsError(f"{path}: adapter {name} comes without its {'B' if kind == 'A' else 'A'}")
        if shapes is None:
            continue
        if weight not in shapes:
            raise WeightsError(f"{path}: adapter {name} belongs to no weight of this model")
        out, inputs = shapes[weight]
        expected = (rank, inputs) if kind == "A" else (out, rank)
        if tuple(adapters[name].shape) != expected:
            raise WeightsError(f"{path}: adapter {name} has shape {tuple(adapters[name].shape)}, this model needs {expected}")
    return adapters, {**info, "rank": rank, "alpha": alpha}


def _adapted_weight(path, name):
    """model.layers.3.self_attn.q_proj.lora_A.weight -> (model.layers.3.self_attn.q_proj.weight, 'A')."""
    match = re.fullmatch(r"(model\.layers\.\d+\.(?:self_attn|mlp)\.(\w+))\.lora_([AB])\.weight", name)
    if match is None or match.group(2) not in lora.TARGETS:
        raise WeightsError(f"{path}: {name} is not the A or B of a LoRA adapter on one of {', '.join(lora.TARGETS)}")
    return match.group(1) + ".weight", match.group(3)


def merge_adapters(params, adapters, scale):
    """params with the adapted weights replaced by W + s·B A in their stored dtype (made one tensor at a
    time, when read: only adapted tensors are widened to compute)."""
    merged = LazyTensors()
    for name in params:
        dtype, shape = safetensors_file.dtype_and_shape(params, name)
        name_a, name_b = lora.adapter_names(name) if name.endswith(".weight") else (None, None)
        if name_a in adapters:
            make = lambda name=name, a=adapters[name_a], b=adapters[name_b], dtype=dtype: dtypes.convert(
                lora.merged(lora.Frozen(dtypes.compute_array(np.asarray(params[name])), a=np.asarray(a, np.float32),
                                        b=np.asarray(b, np.float32), scale=scale)), dtype)
        else:
            make = lambda name=name: params[name]
        merged.add(name, dtype, shape, make)
    return merged


# ---- HF checkpoint directory -------------------------------------------------------------------------
def _read_hf(directory):
    config_path = os.path.join(directory, "config.json")
    with open(config_path) as file:
        config = _config_from_json(config_path, file.read())
    params = {}
    for shard in _hf_shards(directory):
        params.update(_read_safetensors(shard)[1])
    return config, params, _optional_tokenizer(directory)


def _hf_shards(directory):
    single = os.path.join(directory, "model.safetensors")
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(single):
        return [single]
    if not os.path.isfile(index):
        raise WeightsError(f"{directory}: unrecognised checkpoint layout: config.json but neither "
                           "model.safetensors nor model.safetensors.index.json")
    try:
        with open(index) as file:
            weight_map = json.load(file)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise WeightsError(f"{index}: not a safetensors index ({error})") from None
    shards = [os.path.join(directory, name) for name in dict.fromkeys(weight_map.values())]
    for shard in shards:
        if not os.path.isfile(shard):
            raise WeightsError(f"{index}: lists {os.path.basename(shard)}, which is missing")
    return shards


def export_hf(directory, config, params, tokenizer=None):
    """Write an HF transformers checkpoint directory (config.json, model.safetensors, tokenizer.model
    for a SentencePiece tokenizer: HF has no format for a character vocabulary) that
    LlamaForCausalLM.from_pretrained loads."""
    os.makedirs(directory, exist_ok=True)
    stored = {dtypes.name(safetensors_file.dtype_and_shape(params, name)[0]) for name in params}
    torch_dtype = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "fp64": "float64"}
    hf_config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
                 "torch_dtype": torch_dtype[stored.pop()] if len(stored) == 1 else "float32",
                 **config.to_dict()}
    if hf_config.get("rope_scaling") is None:
        del hf_config["rope_scaling"]
    if tokenizer is not None and tokenizer.bos_id is not None:
        hf_config.setdefault("bos_token_id", tokenizer.bos_id)
        hf_config.setdefault("eos_token_id", tokenizer.eos_id)
    safetensors_file.write(os.path.join(directory, "model.safetensors"), _host_tensors(config, params),
                           {"format": "pt"})
    files.write_atomically(os.path.join(directory, "config.json"), [json.dumps(hf_config, indent=2).encode()])
    tokenizer_path = os.path.join(directory, "tokenizer.model")
    if isinstance(tokenizer, tokenizers.SentencePieceTokenizer):
        files.write_atomically(tokenizer_path, [tokenizer.model_bytes])
    elif os.path.exists(tokenizer_path):  # an earlier export's: it does not belong to this model
        os.remove(tokenizer_path)


# ---- Meta's original checkpoints -----------------------------------------------------------------
# How Meta's model parallelism splits each tensor across consolidated.NN.pth (llama/model.py):
# ColumnParallelLinear splits the output rows (axis 0), RowParallelLinear the input columns (axis 1),
# ParallelEmbedding the embedding dimension (axis 1); norms are copied into every shard.
META_NAMES = {  # HF short name -> (Meta name under "layers.{i}.", axis the shards are joined on)
    "input_layernorm": ("attention_norm.weight", None),
    "q_proj": ("attention.wq.weight", 0), "k_proj": ("attention.wk.weight", 0),
    "v_proj": ("attention.wv.weight", 0), "o_proj": ("attention.wo.weight", 1),
    "post_attention_layernorm": ("ffn_norm.weight", None),
    "gate_proj": ("feed_forward.w1.weight", 0), "down_proj": ("feed_forward.w2.weight", 1),
    "up_proj": ("feed_forward.w3.weight", 0),
}
META_TOP = {EMBEDDING: ("tok_embeddings.weight", 1), FINAL_NORM: ("norm.weight", None),
            LM_HEAD: ("output.weight", 0)}
META_DEFAULT_CONTEXT = 4096  # params.json does not say; Llama 2's context (LLaMA 1: 2048)


def _read_meta(directory):
    params_path = os.path.join(directory, "params.json")
    try:
        with open(params_path) as file:
            meta = json.load(file)
    except json.JSONDecodeError as error:
        raise WeightsError(f"{params_path}: not valid JSON ({error})") from None
    shard_paths = sorted(os.path.join(directory, name) for name in os.listdir(directory)
                         if name.startswith("consolidated.") and name.endswith(".pth"))
    if not shard_paths:
        raise WeightsError(f"{directory}: unrecognised checkpoint layout: params.json but no consolidated.*.pth")
    shards = [_read_pth(path) for path in shard_paths]
    tokenizer = _optional_tokenizer(directory)
    config = _meta_config(params_path, meta, shards)
    params = LazyTensors()
    for hf_name, (meta_name, axis) in _meta_names(config).items():
        parts = [shard.get(meta_name) for shard in shards]
        if any(part is None for part in parts):
            continue  # reported as missing by _check, under its HF name
        permute = hf_name.endswith(("q_proj.weight", "k_proj.weight"))
        shape = parts[0].shape if axis is None else \
            tuple(sum(p.shape[a] for p in parts) if a == axis else n for a, n in enumerate(parts[0].shape))
        params.add(hf_name, parts[0].dtype, shape,
                   lambda parts=parts, axis=axis, permute=permute: _join_meta(parts, axis, permute, config))
    return config, params, tokenizer


def _read_pth(path):
    try:
        return torch_pickle.load(path)
    except (torch_pickle.CheckpointFormatError, torch_pickle.UnsafePickleError) as error:
        raise WeightsError(str(error)) from None


def _meta_names(config):
    names = {hf: meta for hf, meta in META_TOP.items() if hf != LM_HEAD or not config.tie_word_embeddings}
    for layer in range(config.num_hidden_layers):
        for short, (meta_name, axis) in META_NAMES.items():
            names[block_param_name(layer, short)] = (f"layers.{layer}.{meta_name}", axis)
    return names


def _join_meta(parts, axis, permute, config):
    joined = parts[0] if axis is None else np.concatenate(parts, axis=axis)
    return rope.from_pairs(joined, config.head_dim) if permute else joined


def _meta_config(path, meta, shards):
    """LlamaConfig from params.json; the sizes params.json leaves implicit (vocabulary, FFN width)
    are read off the tensors."""
    try:
        heads = meta["n_heads"]
        embedding = shards[0]["tok_embeddings.weight"]
        ffn_rows = sum(shard["layers.0.feed_forward.w1.weight"].shape[0] for shard in shards)
        scaling = None
        if meta.get("use_scaled_rope"):  # Llama 3.1's published constants
            scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        return LlamaConfig(vocab_size=embedding.shape[0], hidden_size=meta["dim"], intermediate_size=ffn_rows,
                           num_hidden_layers=meta["n_layers"], num_attention_heads=heads,
                           num_key_value_heads=meta.get("n_kv_heads") or heads,
                           rms_norm_eps=meta.get("norm_eps", 1e-5), rope_theta=meta.get("rope_theta", 10000.0),
                           rope_scaling=scaling,
                           max_position_embeddings=meta.get("max_seq_len", META_DEFAULT_CONTEXT),
                           tie_word_embeddings="output.weight" not in shards[0])
    except KeyError as error:
        raise WeightsError(f"{path}: missing {error.args[0]} (in params.json or the checkpoint)") from None
    except ConfigError as error:
        raise WeightsError(f"{path}: {error}") from None


# ---- llama2.c .bin ------------------------------------------------------------------------------------
LLAMA2C_MAGIC = 0x616B3432  # "ak42"
LLAMA2C_HEADER_BYTES = 256   # versioned files: magic, version, 7 int32 params, flags, zero padding
LLAMA2C_EPS, LLAMA2C_THETA = 1e-5, 10000.0  # fixed in llama2.c's model.py and run.c


def _legacy_llama2c_header(path):
    """The 7 header ints of a legacy llama2.c file, or None when the file is not one (its size must
    match the header exactly)."""
    with open(path, "rb") as file:
        head = file.read(28)
    if len(head) < 28:
        return None
    dim, hidden, layers, heads, kv_heads, vocab, context = struct.unpack("<7i", head)
    if min(dim, hidden, layers, heads, kv_heads, abs(vocab), context) <= 0 or dim % heads:
        return None
    expected = 28 + 4 * _llama2c_float_count(dim, hidden, layers, heads, kv_heads, vocab, context, legacy=True)
    return (dim, hidden, layers, heads, kv_heads, vocab, context) if os.path.getsize(path) == expected else None


def _llama2c_float_count(dim, hidden, layers, heads, kv_heads, vocab, context, legacy):
    kv_dim = dim // heads * kv_heads
    per_layer = 2 * dim + 2 * dim * dim + 2 * dim * kv_dim + 3 * dim * hidden
    rope_tables = context * (dim // heads) if legacy else 0  # freq_cis real and imaginary halves
    classifier = abs(vocab) * dim if (vocab < 0 if legacy else False) else 0
    return abs(vocab) * dim + layers * per_layer + dim + rope_tables + classifier


def _read_llama2c(path):
    with open(path, "rb") as file:
        head = file.read(LLAMA2C_HEADER_BYTES)
    if struct.unpack("<I", head[:4])[0] != LLAMA2C_MAGIC:
        header = _legacy_llama2c_header(path)
        if header is None:
            raise WeightsError(f"{path}: not a llama2.c checkpoint (its size does not match its header)")
        *sizes, vocab, context = header
        return _llama2c_model(path, *sizes, abs(vocab), context, shared=vocab > 0, offset=28, layout="legacy")
    if len(head) < LLAMA2C_HEADER_BYTES:
        raise WeightsError(f"{path}: truncated llama2.c header ({len(head)} of {LLAMA2C_HEADER_BYTES} bytes)")
    version, *sizes = struct.unpack("<i7i", head[4:36])
    shared = bool(head[36])
    if version == 1:
        return _llama2c_model(path, *sizes, shared=shared, offset=LLAMA2C_HEADER_BYTES, layout="v1")
    if version == 2:
        (group,) = struct.unpack("<i", head[37:41])
        return _llama2c_model(path, *sizes, shared=shared, offset=LLAMA2C_HEADER_BYTES, layout="v2", group=group)
    raise WeightsError(f"{path}: llama2.c format version {version} is not supported (versions 0, 1 and 2 are)")


def _llama2c_model(path, dim, hidden, layers, heads, kv_heads, vocab, context, shared, offset, layout, group=None):
    try:
        config = LlamaConfig(vocab_size=vocab, hidden_size=dim, intermediate_size=hidden, num_hidden_layers=layers,
                             num_attention_heads=heads, num_key_value_heads=kv_heads, rms_norm_eps=LLAMA2C_EPS,
                             rope_theta=LLAMA2C_THETA, max_position_embeddings=context, tie_word_embeddings=shared)
    except ConfigError as error:
        raise WeightsError(f"{path}: {error}") from None
    reader = _Llama2cReader(path, offset)
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


class _Llama2cReader:
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


IMPORTERS = {"npllama": _read_npllama, "hf": _read_hf, "meta": _read_meta, "llama2c": _read_llama2c}
