"""The npllama weights file, and the checkpoint layouts it is imported from and exported to.

The npllama weights file is one safetensors file (safetensors_file.py):
    tensors      HF transformers' names and layouts (config.py), in the dtype they were saved in; a
                 quantized weight (runtime/quantized.py) as its bytes, laid out for the product: U8
                 (in / 32, out × block bytes), a block column per row (Quantized.data). Format 2
                 (npllama 0.3) kept a row of blocks per row, float16 scales: read, and laid out anew
    metadata     "npllama.config":    the config as config.json's JSON
                 "npllama.tokenizer": the tokenizer (tokenizer.to_metadata), absent when there is none
                 "npllama.quantized": {name: {"type": "q8_0", "shape": [out, in]}} of the quantized
                                      weights, absent when there are none
                 "format": "pt", which lets HF's safetensors loader read the tensors too
so `generate --weights FILE` needs no other file. `load` maps it into memory (nothing is read until
used); `save` writes a temporary file and renames it.

Sources `load` reads (`detect` tells them apart: a directory by its files, a file by its first bytes):
    npllama file    as above
    HF directory    config.json; model.safetensors, or shards listed in model.safetensors.index.json;
                    tokenizer.model when present
    Meta directory  params.json; consolidated.00.pth (.01, .02 … for 13B and up: model-parallel shards,
                    each tensor split along the axis its layer is parallel on); tokenizer.model
    llama2.c .bin   the legacy header (7 int32s, vocab negative when the classifier is not shared),
                    or the versioned one (magic "ak42", version 1: float32; version 2: int8, kept as q8_0)
    GGUF            llama.cpp's file (magic "GGUF"): metadata, tokenizer and tensors, F32/F16/BF16 or
                    quantized (Q8_0, Q4_0, Q4_1 kept as blocks, the others made Q8_0: gguf_file.py);
                    export_gguf writes one
each read by its own module (hf.py, meta.py, llama2c.py, gguf_file.py). Meta, llama2.c and GGUF store
q and k rows in RoPE's interleaved-pair order; they are permuted to HF's rotate-half order on import
(rope.from_pairs), so the model has one convention everywhere. Converted tensors are made when read
(LazyTensors), one at a time: a 13 GB import never holds more than a tensor's worth of converted data.

LoRA adapters have a small file of their own (save_adapters, load_adapters; merge_adapters folds them in),
which records a fingerprint of the model they were trained on: loading them onto another model is refused.
"""
import collections
import functools
import json
import os
import re
import struct
import warnings
import zipfile

import numpy as np

from .. import backend, dtypes
from ..adapters import TARGETS as LORA_TARGETS, Adapted, adapter_names
from ..config import human_bytes, human_count, parameter_shapes
from ..errors import Notice
from ..runtime.quantized import BLOCK, LAYOUTS, Quantized, QuantizeError
from . import gguf_file, hf, llama2c, meta, safetensors_file, tokenizer as tokenizers
from .common import (LazyTensors, WeightsError, as_storage_type, config_from_json, host_floats,  # noqa: F401
                     host_tensors, TokenizerWarning, read_safetensors, read_tokenizer, tokenizer_settings)

FORMAT_VERSION = "1"
BLOCKS_FORMAT_VERSION = "3"  # a file holding quantized blocks (QUANTIZED_KEY), laid out by block column
ROWS_OF_BLOCKS_VERSION = "2"  # npllama 0.3's quantized files: a row of blocks per row
RUN_MODEL_FILE = "model.safetensors"  # where a training run keeps its model (train.MODEL_FILE)
CONFIG_KEY, TOKENIZER_KEY, VERSION_KEY = "npllama.config", "npllama.tokenizer", "npllama.version"
QUANTIZED_KEY = "npllama.quantized"


def save(path, config, params, tokenizer=None, dtype=None, metadata=None, on_tensor=lambda done, total: None):
    """Write the npllama weights file atomically; dtype converts tensors (host_tensors: 'fp16', or a block
    type such as 'q8_0' for the matrices), else they are kept as stored, quantized ones too.
    metadata (str -> str) is stored beside the config (training writes its step there); on_tensor(done,
    total) as each tensor is made to be written."""
    _check_vocabulary(path, config, tokenizer, warn=False)
    tensors = host_tensors(config, params, dtype, on_tensor)
    metadata = {**(metadata or {}), "format": "pt", VERSION_KEY: FORMAT_VERSION,
                CONFIG_KEY: json.dumps(config.to_dict())}
    if tokenizer is not None:
        metadata[TOKENIZER_KEY] = tokenizers.to_metadata(tokenizer)
    described = {name: tensors.describe(name) for name in tensors}
    quantized = {name: {"type": kind, "shape": list(shape)} for name, (kind, shape) in described.items()
                 if dtypes.is_quantized(kind)}
    if quantized:
        metadata[QUANTIZED_KEY] = json.dumps(quantized)
        metadata[VERSION_KEY] = BLOCKS_FORMAT_VERSION  # older readers say "written by a newer npllama"
    safetensors_file.write(path, tensors, metadata)


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
    'llama2c' (WeightsError when none). A directory is known by its files, a file by its first bytes
    (file_format), whatever its name."""
    if not os.path.exists(path):
        raise WeightsError(f"{path}: no such file or directory")
    if os.path.isdir(path):
        for marker, kind in (("config.json", "hf"), ("params.json", "meta"), (RUN_MODEL_FILE, "run")):
            if os.path.isfile(os.path.join(path, marker)):
                return kind
        raise WeightsError(f"{path}: unrecognised checkpoint layout: a directory needs config.json "
                           f"(HF), params.json (Meta) or {RUN_MODEL_FILE} (a training run's)")
    with open(path, "rb") as file:
        head = file.read(HEAD_BYTES)
    kind = file_format(head)
    if kind == "zip":
        _refuse_zip(path)
    if kind == "pickle":
        raise WeightsError(f"{path}: a Python pickle (torch.save's format before torch 1.6), which npllama does "
                           "not read (unpickling can run code); re-save it with a recent torch, or as safetensors")
    if kind is None:
        raise WeightsError(f"{path}: not a safetensors file, nor GGUF, a llama2.c checkpoint or a PyTorch zip "
                           f"({f'it starts {head[:8]!r}' if head else 'it is empty'}); npllama reads those, and "
                           "HF and Meta checkpoint directories")
    return kind


HEAD_BYTES = llama2c.LEGACY_HEADER.size  # every format's magic, and a legacy llama2.c header


def file_format(head):
    """The format a file's first bytes announce (its magic number), or None:
        'gguf'     "GGUF"
        'llama2c'  versioned: "ak42" as a little-endian uint32 (b"24ka"); legacy: no magic, 7 int32 sizes
                   that could be a model's (llama2c.legacy_header), tried last
        'npllama'  safetensors: an 8-byte little-endian header length, then the JSON header's "{"
        'zip'      "PK\\x03\\x04", a zip archive's first local header: torch.save since torch 1.6
        'pickle'   0x80 (PROTO), a protocol from 2 to 5, then an opcode (never 0, which tells a legacy
                   llama2.c dim such as 640 = 80 02 00 00 apart): torch.save before 1.6"""
    if head[:4] == b"GGUF":
        return "gguf"
    if head[:4] == llama2c.MAGIC_BYTES:
        return "llama2c"
    if head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] <= safetensors_file.MAX_HEADER_BYTES:
        return "npllama"
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if len(head) >= 3 and head[0] == 0x80 and 2 <= head[1] <= 5 and head[2] != 0:
        return "pickle"
    return "llama2c" if llama2c.legacy_header(head) is not None else None


def _refuse_zip(path):
    """A zip archive is a checkpoint only as torch.save writes it, which npllama reads within a Meta
    directory (whose params.json gives the config)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except zipfile.BadZipFile:
        raise WeightsError(f"{path}: a zip archive cut short or damaged (its central directory, at the end, "
                           "is missing)") from None
    if not any(name.endswith("/data.pkl") for name in names):
        raise WeightsError(f"{path}: a zip archive without a torch.save data.pkl, not a checkpoint npllama reads")
    raise WeightsError(f"{path}: a PyTorch (torch.save) checkpoint; npllama reads one as part of a Meta "
                       "directory: give the directory that holds it with params.json")


def _read_npllama(path):
    metadata, tensors = read_safetensors(path)
    if ADAPTERS_KEY in metadata:
        raise WeightsError(f"{path}: LoRA adapters, not a model: give them with --lora beside the model they were "
                           "trained on, or fold them into it with merge-lora")
    if CONFIG_KEY not in metadata:
        raise WeightsError(f"{path}: a safetensors file without an npllama config; for an HF checkpoint "
                           "give its directory (with config.json)")
    if int(metadata.get(VERSION_KEY, FORMAT_VERSION)) > int(BLOCKS_FORMAT_VERSION):
        raise WeightsError(f"{path}: written by a newer npllama (format {metadata[VERSION_KEY]}); upgrade npllama")
    config = config_from_json(path, metadata[CONFIG_KEY])
    tokenizer = tokenizers.from_metadata(metadata[TOKENIZER_KEY]) if TOKENIZER_KEY in metadata else None
    quantized = _quantized_tensors(path, metadata, tensors)
    if metadata.get(VERSION_KEY) != ROWS_OF_BLOCKS_VERSION:
        return config, {**tensors, **quantized}, tokenizer
    params = LazyTensors()  # format 2: each weight of blocks is laid out anew when first used
    for name, value in tensors.items():
        params.add(name, value.dtype, value.shape, lambda value=value: value)
    for name, (kind, shape, make) in quantized.items():
        params.add(name, kind, shape, functools.cache(make))
    return config, params, tokenizer


def _check_rows_of_blocks(kind, data, shape):
    """Format 2's bytes of a weight: out rows of in / 32 blocks."""
    out, width = shape
    expected = out * width // BLOCK * LAYOUTS[kind].itemsize
    if width % BLOCK or data.size != expected:
        raise QuantizeError(f"{data.size:,} bytes are not {kind} blocks of a {out} × {width} weight "
                            f"({expected:,} bytes)")


def _from_rows_of_blocks(kind, data, shape):
    """A weight from format 2's bytes: a row's block fields one after another, field by field (all its d,
    then (q4_1) all its m, then all its q), float16 scales. Laid out anew (a copy)."""
    out, width = shape
    layout = LAYOUTS[kind]
    rows, blocks, first = data.reshape(out, -1), np.empty((out, width // BLOCK), layout), 0
    for field in layout.names:
        end = first + blocks.shape[1] * layout[field].itemsize
        blocks[field] = rows[:, first:end].view(layout[field].base).reshape(blocks[field].shape)
        first = end
    return Quantized.from_blocks(kind, blocks)


def _positive_sizes(shape):
    if not isinstance(shape, list) or not all(isinstance(n, int) and n > 0 for n in shape):
        raise ValueError(f"{shape!r} is not a list of positive sizes")
    return tuple(shape)


def _quantized_tensors(path, metadata, tensors):
    """The tensors QUANTIZED_KEY lists, checked: as Quantized weights on the file's (memory-mapped) bytes,
    or for format 2 as (kind, shape, a function making the weight)."""
    try:
        listed = {name: (entry["type"], _positive_sizes(entry["shape"]))
                  for name, entry in json.loads(metadata.get(QUANTIZED_KEY, "{}")).items()}
    except (AttributeError, KeyError, TypeError, ValueError):
        raise WeightsError(f"{path}: its record of quantized tensors ({QUANTIZED_KEY}) is damaged") from None
    quantized = {}
    for name, (kind, shape) in listed.items():
        if kind not in dtypes.QUANTIZED:
            raise WeightsError(f"{path}: tensor {name}: {kind!r} is not a block type npllama knows "
                               f"({', '.join(dtypes.QUANTIZED)})")
        if name not in tensors or tensors[name].dtype != np.uint8 or len(shape) != 2:
            raise WeightsError(f"{path}: tensor {name} is listed as {kind} blocks of shape {shape}, but the file "
                               "has no such tensor of bytes")
        try:
            if metadata.get(VERSION_KEY) == ROWS_OF_BLOCKS_VERSION:
                _check_rows_of_blocks(kind, tensors[name], shape)
                quantized[name] = (kind, shape, functools.partial(_from_rows_of_blocks, kind, tensors[name], shape))
            else:
                quantized[name] = Quantized.from_data(kind, tensors[name], shape)
        except QuantizeError as error:
            raise WeightsError(f"{path}: tensor {name}: {error}") from None
    return quantized


def _check(path, config, params, tokenizer):
    """Every tensor the config calls for is present with its shape; the tokenizer fits the vocabulary."""
    for name, shape in parameter_shapes(config).items():
        if name not in params:
            raise WeightsError(f"{path}: missing tensor {name} (the config has {config.num_hidden_layers} "
                               f"layers, {'tied' if config.tie_word_embeddings else 'untied'} embeddings)")
        dtype, found = safetensors_file.dtype_and_shape(params, name)
        if found != shape:
            raise WeightsError(f"{path}: tensor {name} has shape {found}, the config says {shape}")
        if not dtypes.is_quantized(dtype) and dtype != dtypes.BFLOAT16 and dtype.kind != "f":
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
    """A short multi-line summary: parameters, shape, storage types (with their tensor counts when there
    are several: "q8_0 (169 tensors), fp32 (61 tensors)"), size on disk, tokenizer."""
    counts = collections.Counter(dtypes.name(safetensors_file.dtype_and_shape(params, name)[0]) for name in params)
    stored = [f"{kind} ({count} tensor{'s' * (count != 1)})" if len(counts) > 1 else kind for kind, count in
              sorted(counts.items(), key=lambda item: (-item[1], item[0]))]
    lines = [f"parameters  {config.num_parameters():,} ({human_count(config.num_parameters())})",
             f"layers      {config.num_hidden_layers}, hidden {config.hidden_size}, "
             f"intermediate {config.intermediate_size}, context {config.max_position_embeddings}",
             f"heads       {config.num_attention_heads} query, {config.num_key_value_heads} key/value "
             f"(head dim {config.head_dim})",
             f"vocabulary  {config.vocab_size}, embeddings {'tied' if config.tie_word_embeddings else 'untied'}",
             f"dtype       {', '.join(stored)}",
             f"tokenizer   {_describe_tokenizer(tokenizer)}"]
    if path is not None:
        lines.append(f"on disk     {human_bytes(os.path.getsize(path))} ({path})")
    return "\n".join(lines)


def _describe_tokenizer(tokenizer):
    if tokenizer is None:
        return "none (generate takes token ids)"
    if tokenizer.kind == "char":
        return tokenizer.describe()
    stops = ", ".join(repr(tokenizer.token_text(i)) for i in tokenizer.eos_ids) or "none"
    return (f"{tokenizer.describe()}; {'BOS first' if tokenizer.add_bos else 'no BOS'}; stops at {stops}; "
            f"{'a chat template' if tokenizer.chat_template else 'no chat template'}")


# ---- LoRA adapters --------------------------------------------------------------------------------------
ADAPTERS_KEY, BASE_KEY = "npllama.lora", "npllama.lora_base"
BASE_SAMPLES = 64  # values of each adapted weight that identify the base model
# Above this relative difference the base is another model. A copy of the same weights differs by at most
# 0.05% in fp16 (2^-11), 0.4% in bf16 (2^-8), about 0.5% in Q8_0 and 10% in Q4_0; another model's weight
# by about 100% or more (√2 between two independent weights of one scale).
BASE_TOLERANCE = 0.5


class WrongBaseError(WeightsError):
    """LoRA adapters given a model other than the one they were trained on."""


def save_adapters(path, adapters, rank, alpha, targets, metadata=None, base_params=None, base_name=None):
    """A small safetensors file of LoRA adapters (adapters.adapter_names -> A or B) and, in its metadata,
    their rank, alpha and targets (written atomically). With base_params (the model they are trained on),
    its fingerprint too, which load_adapters checks: BASE_SAMPLES values of each adapted weight
    (base_sample), and base_name for messages."""
    metadata = {**(metadata or {}), ADAPTERS_KEY: json.dumps({"rank": rank, "alpha": alpha, "targets": list(targets)})}
    if base_params is not None:
        samples = {weight: [float(f"{value:.6g}") for value in base_sample(base_params[weight])]
                   for weight in _adapted_weights(path, adapters)}
        metadata[BASE_KEY] = json.dumps({"name": base_name, "samples": samples})
    safetensors_file.write(path, {name: backend.to_host(value) for name, value in adapters.items()}, metadata)


def load_adapters(path, config=None, base_params=None):
    """(adapters: name -> array, info: {"rank", "alpha", "targets"}) from save_adapters' file. Every A
    needs its B; with a config, each pair must fit a projection of that model; with base_params (that
    model's), the model must be the one they were trained on (WrongBaseError), as far as the file's
    fingerprint tells: a file without one is taken, with a notice."""
    metadata, adapters, info = _read_adapters(path)
    rank = info["rank"]
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
    if base_params is not None:
        _check_base(path, metadata, adapters, base_params)
    return adapters, info


def _read_adapters(path):
    """(metadata, adapters, info: {"rank", "alpha", "targets"}) of an adapters file."""
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
    return metadata, adapters, {**info, "rank": rank, "alpha": alpha}


def describe_adapters(path):
    """A short multi-line summary of an adapters file: rank, alpha, targets, size, the model they were
    trained on."""
    metadata, adapters, info = _read_adapters(path)
    layers = {weight.split(".")[2] for weight in _adapted_weights(path, adapters)}  # model.layers.N. ...
    count = sum(int(np.prod(adapters[name].shape)) for name in adapters)
    stored = sorted({dtypes.name(adapters[name].dtype) for name in adapters})
    fingerprint = _fingerprint(path, metadata, adapters)
    name = fingerprint and fingerprint["name"] or metadata.get("base")  # (where training runs recorded it before)
    return "\n".join([
        f"adapters    LoRA rank {info['rank']}, alpha {info['alpha']:g} (scale {info['alpha'] / info['rank']:g}) "
        f"on {', '.join(info['targets'])} in {len(layers)} layer{'s' if len(layers) != 1 else ''}",
        f"parameters  {count:,} ({human_count(count)}) in {len(adapters)} tensors",
        f"dtype       {', '.join(stored)}",
        f"base model  {name or 'not named'}; " + ("its weights are checked where the adapters are loaded" if fingerprint
                                                  else "not checked where the adapters are loaded (no fingerprint)"),
        f"on disk     {human_bytes(os.path.getsize(path))} ({path})"])


def base_sample(weight):
    """BASE_SAMPLES values of a matrix along its diagonal, corner to corner (rows and columns evenly
    spread), as float64 on the host: what tells its model apart, in any format and precision."""
    out, inputs = weight.shape
    steps = np.arange(BASE_SAMPLES)
    rows = backend.to_host(weight[backend.on_device_of(weight, steps * out // BASE_SAMPLES)])  # (a Quantized widens them)
    return dtypes.compute_array(rows[steps, steps * inputs // BASE_SAMPLES]).astype(np.float64)


def _check_base(path, metadata, adapters, base_params):
    """WrongBaseError when an adapted weight's sample differs from the one recorded by more than
    BASE_TOLERANCE (relative, in norm); a notice when no fingerprint was recorded."""
    fingerprint = _fingerprint(path, metadata, adapters)
    if fingerprint is None:
        warnings.warn(f"{path} records no fingerprint of the model its adapters were trained on (an older npllama "
                      "wrote it), so they cannot be checked to fit this one", Notice)
        return
    for weight, recorded in fingerprint["samples"].items():
        scale = max(np.linalg.norm(recorded), 1e-30)  # (a weight recorded as zeros: anything else differs)
        difference = np.linalg.norm(base_sample(base_params[weight]) - recorded) / scale
        if not difference <= BASE_TOLERANCE:
            trained_on = f" ({fingerprint['name']})" if fingerprint["name"] else ""
            raise WrongBaseError(f"{path} were trained on a different model{trained_on}: {_layer_weight(weight)} "
                                 f"differs by {difference:.0%}; pass the model they were trained on")


def _fingerprint(path, metadata, adapters):
    """{"name": the base's name or None, "samples": adapted weight -> its recorded base_sample}, or None
    when the file has no fingerprint."""
    if BASE_KEY not in metadata:
        return None
    try:
        fingerprint = json.loads(metadata[BASE_KEY])
        samples = {weight: np.asarray(values, np.float64) for weight, values in fingerprint["samples"].items()}
        if sorted(samples) != sorted(_adapted_weights(path, adapters)) or \
                any(values.shape != (BASE_SAMPLES,) for values in samples.values()):
            raise ValueError
        return {"name": fingerprint.get("name"), "samples": samples}
    except (AttributeError, KeyError, TypeError, ValueError):
        raise WeightsError(f"{path}: its record of the model it was trained on ({BASE_KEY}) is damaged") from None


def _adapted_weights(path, adapters):
    """The names of the weights the adapters attach to, in the adapters' order."""
    return list(dict.fromkeys(_adapted_weight(path, name)[0] for name in adapters))


def _layer_weight(weight):
    """model.layers.3.self_attn.q_proj.weight -> 'q_proj of layer 3'."""
    layer, short = re.fullmatch(r"model\.layers\.(\d+)\.\w+\.(\w+)\.weight", weight).groups()
    return f"{short} of layer {layer}"


def _adapted_weight(path, name):
    """model.layers.3.self_attn.q_proj.lora_A.weight -> (model.layers.3.self_attn.q_proj.weight, 'A')."""
    match = re.fullmatch(r"(model\.layers\.\d+\.(?:self_attn|mlp)\.(\w+))\.lora_([AB])\.weight", name)
    if match is None or match.group(2) not in LORA_TARGETS:
        raise WeightsError(f"{path}: {name} is not the A or B of a LoRA adapter on one of {', '.join(LORA_TARGETS)}")
    return match.group(1) + ".weight", match.group(3)


def merge_adapters(params, adapters, scale):
    """params with the adapted weights replaced by W + s·B A in their storage type (made one tensor at a
    time, when read: only adapted tensors are widened to compute); a quantized W gives Ŵ + s·B A in
    float32: quantized again, the adapters' small change would be lost in the blocks' rounding."""
    merged = LazyTensors()
    for name in params:
        dtype, shape = safetensors_file.dtype_and_shape(params, name)
        name_a, name_b = adapter_names(name) if name.endswith(".weight") else (None, None)
        if name_a in adapters:
            dtype = np.dtype(np.float32) if dtypes.is_quantized(dtype) else dtype
            make = lambda name=name, a=adapters[name_a], b=adapters[name_b], dtype=dtype: as_storage_type(
                Adapted(host_floats(params[name]), np.asarray(a, np.float32), np.asarray(b, np.float32),
                        scale).merged(), dtype)
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
