"""The npllama weights file, and the checkpoint layouts it is imported from and exported to.

The npllama weights file is one safetensors file (safetensors_file.py):
    tensors      HF transformers' names and layouts (config.py), in the dtype they were saved in
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
    GGUF            llama.cpp's file (magic "GGUF"): metadata, tokenizer and tensors, F32/F16/BF16 or
                    quantized (dequantized when read); export_gguf writes one
each read by its own module (hf.py, meta.py, llama2c.py, gguf_file.py). Meta, llama2.c and GGUF store
q and k rows in RoPE's interleaved-pair order; they are permuted to HF's rotate-half order on import
(rope.from_pairs), so the model has one convention everywhere. Converted tensors are made when read
(LazyTensors), one at a time: a 13 GB import never holds more than a tensor's worth of converted data.

LoRA adapters have a small file of their own (save_adapters, load_adapters; merge_adapters folds them in).
"""
import json
import os
import re
import struct
import warnings

import numpy as np

from .. import backend, dtypes
from ..adapters import TARGETS as LORA_TARGETS, Adapted, adapter_names
from ..config import human_count, parameter_shapes
from . import gguf_file, hf, llama2c, meta, safetensors_file, tokenizer as tokenizers
from .common import (LazyTensors, WeightsError, config_from_json, host_tensors,  # noqa: F401 (re-exported)
                     TokenizerWarning, read_safetensors, read_tokenizer, tokenizer_settings)

FORMAT_VERSION = "1"
RUN_MODEL_FILE = "model.safetensors"  # where a training run keeps its model (train.MODEL_FILE)
CONFIG_KEY, TOKENIZER_KEY, VERSION_KEY = "npllama.config", "npllama.tokenizer", "npllama.version"


def save(path, config, params, tokenizer=None, dtype=None, metadata=None):
    """Write the npllama weights file atomically; dtype (e.g. 'fp16') converts tensors, else kept.
    metadata (str -> str) is stored beside the config (training writes its step there)."""
    _check_vocabulary(path, config, tokenizer, warn=False)
    metadata = {**(metadata or {}), "format": "pt", VERSION_KEY: FORMAT_VERSION,
                CONFIG_KEY: json.dumps(config.to_dict())}
    if tokenizer is not None:
        metadata[TOKENIZER_KEY] = tokenizers.to_metadata(tokenizer)
    safetensors_file.write(path, host_tensors(config, params, dtype), metadata)


def load(path, tokenizer_path=None):
    """(config, params, tokenizer) from any source `detect` recognises; tokenizer is None when the
    source has none. tokenizer_path (a SentencePiece .model or tokenizer.json) replaces or supplies the
    tokenizer.
    Tensors keep their stored dtype and are memory-mapped where the source allows."""
    kind = detect(path)
    config, params, tokenizer = IMPORTERS[kind](path)
    if tokenizer_path is not None:  # with the conventions its directory gives (an HF directory's files)
        tokenizer = read_tokenizer(tokenizer_path, **tokenizer_settings(os.path.dirname(os.path.abspath(tokenizer_path))))
    _check(path, config, params, tokenizer)
    return config, params, tokenizer


def detect(path):
    """Which source path is: 'npllama', 'hf', 'meta', 'run' (a training run's directory), 'gguf' or
    'llama2c' (WeightsError when none)."""
    if not os.path.exists(path):
        raise WeightsError(f"{path}: no such file or directory")
    if os.path.isdir(path):
        for marker, kind in (("config.json", "hf"), ("params.json", "meta"), (RUN_MODEL_FILE, "run")):
            if os.path.isfile(os.path.join(path, marker)):
                return kind
        raise WeightsError(f"{path}: unrecognised checkpoint layout: a directory needs config.json "
                           f"(HF), params.json (Meta) or {RUN_MODEL_FILE} (a training run's)")
    with open(path, "rb") as file:
        head = file.read(8)
    if head[:4] == b"GGUF":
        return "gguf"
    if len(head) == 8 and struct.unpack("<I", head[:4])[0] == llama2c.MAGIC:
        return "llama2c"
    if path.endswith(".bin") and llama2c.legacy_header(path) is not None:
        return "llama2c"
    return "npllama"  # anything else must be a safetensors file; reading it says if it is not


def _read_npllama(path):
    metadata, tensors = read_safetensors(path)
    if CONFIG_KEY not in metadata:
        raise WeightsError(f"{path}: a safetensors file without an npllama config; for an HF checkpoint "
                           "give its directory (with config.json)")
    if int(metadata.get(VERSION_KEY, FORMAT_VERSION)) > int(FORMAT_VERSION):
        raise WeightsError(f"{path}: written by a newer npllama (format {metadata[VERSION_KEY]}); upgrade npllama")
    config = config_from_json(path, metadata[CONFIG_KEY])
    tokenizer = tokenizers.from_metadata(metadata[TOKENIZER_KEY]) if TOKENIZER_KEY in metadata else None
    return config, tensors, tokenizer


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
    _check_vocabulary(path, config, tokenizer)


def _check_vocabulary(path, config, tokenizer, warn=True):
    """Every token id needs its embedding row. A model may have more rows than tokens (embeddings padded,
    as DeepSeek's 102,400 for 100,015 tokens): said in a warning, since it may also be the wrong
    tokenizer; generation never samples the ids without text."""
    if tokenizer is None or tokenizer.vocab_size == config.vocab_size:
        return
    if tokenizer.vocab_size > config.vocab_size:
        raise WeightsError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but the model's "
                           f"vocab_size is {config.vocab_size}")
    if warn:
        warnings.warn(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens, the model {config.vocab_size} "
                      f"rows: ids from {tokenizer.vocab_size} on have no text (padding, or the wrong tokenizer)",
                      TokenizerWarning)


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
             f"tokenizer   {_describe_tokenizer(tokenizer)}"]
    if path is not None:
        lines.append(f"on disk     {_human_bytes(os.path.getsize(path))} ({path})")
    return "\n".join(lines)


def _describe_tokenizer(tokenizer):
    if tokenizer is None:
        return "none (generate takes token ids)"
    if tokenizer.kind == "char":
        return tokenizer.describe()
    stops = ", ".join(repr(tokenizer.token_text(i)) for i in tokenizer.eos_ids) or "none"
    return (f"{tokenizer.describe()}; {'BOS first' if tokenizer.add_bos else 'no BOS'}; stops at {stops}; "
            f"{'a chat template' if tokenizer.chat_template else 'no chat template'}")


def _human_bytes(size):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.4g} {unit}"
        size /= 1024
    return f"{size:.4g} TiB"


# ---- LoRA adapters --------------------------------------------------------------------------------------
ADAPTERS_KEY = "npllama.lora"


def save_adapters(path, adapters, rank, alpha, targets, metadata=None):
    """A small safetensors file of LoRA adapters (adapters.adapter_names -> A or B) and, in its metadata,
    their rank, alpha and targets (written atomically)."""
    info = {"rank": rank, "alpha": alpha, "targets": list(targets)}
    safetensors_file.write(path, {name: backend.to_host(value) for name, value in adapters.items()},
                           {**(metadata or {}), ADAPTERS_KEY: json.dumps(info)})


def load_adapters(path, config=None):
    """(adapters: name -> array, info: {"rank", "alpha", "targets"}) from save_adapters' file. Every A
    needs its B; with a config, each pair must fit a projection of that model."""
    if not os.path.isfile(path):
        raise WeightsError(f"{path}: no such file")
    metadata, adapters = read_safetensors(path)
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
        name_a, name_b = adapter_names(weight)
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
    if match is None or match.group(2) not in LORA_TARGETS:
        raise WeightsError(f"{path}: {name} is not the A or B of a LoRA adapter on one of {', '.join(LORA_TARGETS)}")
    return match.group(1) + ".weight", match.group(3)


def merge_adapters(params, adapters, scale):
    """params with the adapted weights replaced by W + s·B A in their stored dtype (made one tensor at a
    time, when read: only adapted tensors are widened to compute)."""
    merged = LazyTensors()
    for name in params:
        dtype, shape = safetensors_file.dtype_and_shape(params, name)
        name_a, name_b = adapter_names(name) if name.endswith(".weight") else (None, None)
        if name_a in adapters:
            make = lambda name=name, a=adapters[name_a], b=adapters[name_b], dtype=dtype: dtypes.convert(
                Adapted(dtypes.compute_array(np.asarray(params[name])), np.asarray(a, np.float32),
                             np.asarray(b, np.float32), scale).merged(), dtype)
        else:
            make = lambda name=name: params[name]
        merged.add(name, dtype, shape, make)
    return merged


def _read_run(directory):
    """A training run's directory: its model file (an npllama weights file)."""
    return _read_npllama(os.path.join(directory, RUN_MODEL_FILE))


export_hf = hf.export
export_gguf = gguf_file.export
IMPORTERS = {"npllama": _read_npllama, "run": _read_run, "hf": hf.read, "meta": meta.read, "llama2c": llama2c.read,
             "gguf": gguf_file.read}
