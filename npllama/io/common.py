"""What the checkpoint formats share: WeightsError, tensors made when read (LazyTensors), tensors put in
the storage type they are written in (host_tensors), and reading the pieces a checkpoint is made of
(safetensors, config JSON, tokenizer) with one-line errors."""
import collections.abc
import json
import os
import warnings

import numpy as np

from .. import backend, dtypes
from ..config import ConfigError, LlamaConfig, parameter_shapes
from ..errors import Notice, UserError
from ..runtime.quantized import BLOCK, Quantized, quantize
from . import safetensors_file, tokenizer as tokenizers


class WeightsError(UserError):
    """A checkpoint that cannot be used (message is one line, names the file, fit for the user)."""


class LazyTensors(collections.abc.Mapping):
    """name -> array (or Quantized weight), each made when it is read (and not kept): joining shards,
    permuting rows and converting dtypes happen one tensor at a time. Its storage type (dtypes.resolve's)
    and shape are known without making it."""

    def __init__(self):
        self._entries = {}

    def add(self, name, dtype, shape, make):
        self._entries[name] = (dtypes.resolve(dtype), tuple(shape), make)

    def describe(self, name):
        dtype, shape, _ = self._entries[name]
        return dtype, shape

    def __getitem__(self, name):
        return self._entries[name][2]()

    def __contains__(self, name):  # (Mapping's would make the tensor to find out)
        return name in self._entries

    def __iter__(self):
        return iter(self._entries)

    def __len__(self):
        return len(self._entries)


def host_tensors(config, params, dtype=None, on_tensor=lambda done, total: None):
    """The config's tensors, each moved to the host and put in its storage type only when it is written;
    on_tensor(done, total) is called as each is made (a writer's progress). dtype None keeps each as
    stored; a float dtype converts every tensor (quantized ones dequantized); a block type ('q8_0',
    'q4_0', 'q4_1') quantizes every matrix whose rows are a multiple of the 32-value block and keeps
    vectors (the norms) float32 and other matrices float16 (said in one Notice naming them)."""
    tensors, names = LazyTensors(), list(parameter_shapes(config))
    shapes = {name: safetensors_file.dtype_and_shape(params, name) for name in names}
    wanted = None if dtype is None else dtypes.resolve(dtype)
    targets = {name: stored if wanted is None else _storage_type(wanted, shape)
               for name, (stored, shape) in shapes.items()}
    unblocked = [name for name, (_, shape) in shapes.items()
                 if dtypes.is_quantized(wanted) and len(shape) == 2 and targets[name] != wanted]
    if unblocked:
        warnings.warn(f"{', '.join(unblocked)}: rows not a multiple of {BLOCK} values cannot be {wanted} blocks; "
                      "kept in fp16", Notice)
    for number, name in enumerate(names, start=1):
        tensors.add(name, targets[name], shapes[name][1], lambda name=name, number=number: _made(
            as_storage_type(params[name], targets[name]), on_tensor, number, len(names)))
    return tensors


def _storage_type(dtype, shape):
    """What a tensor of shape is written in when dtype is asked for: a block type only for a matrix whose
    rows the blocks divide (float32 for a vector, float16 for another matrix); a float dtype as it is."""
    if not dtypes.is_quantized(dtype):
        return dtype
    if len(shape) != 2:
        return np.dtype(np.float32)
    return dtype if shape[1] % BLOCK == 0 else np.dtype(np.float16)


def as_storage_type(value, dtype):
    """A weight (host or device array, or Quantized) on the host in the storage type dtype: converted,
    dequantized or quantized (runtime/quantized.py's formulas); itself when it already is."""
    if isinstance(value, Quantized) and value.kind == dtype:
        return value
    if dtypes.is_quantized(dtype):
        return quantize(host_floats(value, np.float32), dtype)
    return dtypes.convert(value.dequantized() if isinstance(value, Quantized) else backend.to_host(value), dtype)


def host_floats(value, dtype=None):
    """A weight's values as a host array to compute with (bf16 widened, a Quantized weight dequantized to
    float32: x̂ = d·q, d·(q − 8) or d·q + m), cast to dtype when one is given."""
    array = value.dequantized() if isinstance(value, Quantized) else backend.to_host(value)
    return dtypes.compute_array(array, dtype)


def _made(array, on_tensor, number, total):
    on_tensor(number, total)
    return array


def read_safetensors(path):
    try:
        return safetensors_file.read(path)
    except safetensors_file.SafetensorsError as error:
        raise WeightsError(str(error)) from None


def config_from_json(path, text):
    try:
        return LlamaConfig.from_dict(json.loads(text))
    except json.JSONDecodeError as error:
        raise WeightsError(f"{path}: the config is not valid JSON ({error})") from None
    except ConfigError as error:
        raise WeightsError(f"{path}: {error}") from None


def read_tokenizer(path, **settings):
    try:
        return tokenizers.load(path, **settings)
    except OSError as error:
        raise WeightsError(f"{path}: cannot read the tokenizer ({error.strerror})") from None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")  # the first one present is read


def directory_tokenizer(directory):
    """The tokenizer of an HF or Meta directory with the model's conventions (tokenizer_settings), or
    None, with a warning, when the directory has none that npllama can read."""
    present = [name for name in TOKENIZER_FILES if os.path.isfile(os.path.join(directory, name))]
    if not present:
        warnings.warn(f"{directory} has no tokenizer (tokenizer.json or tokenizer.model): give token ids, "
                      "or pass --tokenizer", TokenizerWarning)
        return None
    return read_tokenizer(os.path.join(directory, present[0]), **tokenizer_settings(directory))


def tokenizer_settings(directory):
    """What transformers reads beside a tokenizer file, as tokenizer.load's settings: tokenizer_config.json
    (add_bos_token, bos_token, eos_token, tokenizer_class, legacy, add_prefix_space, chat_template; the
    tokens from special_tokens_map.json when the config has no added_tokens_decoder), the chat
    template's own files, and the stop ids (generation_config.json's eos_token_id, else config.json's)."""
    config = _json_file(directory, "tokenizer_config.json")
    if "added_tokens_decoder" not in config:  # as transformers 5: the older layout's map has the last word
        config.update({key: value for key, value in _json_file(directory, "special_tokens_map.json").items()
                       if key in ("bos_token", "eos_token")})
    settings = {"add_bos": config.get("add_bos_token"),
                "bos_token": _token_text(config.get("bos_token")),
                "eos_token": _token_text(config.get("eos_token")),
                "chat_template": _chat_template(directory, config.get("chat_template")),
                "tokenizer_class": config.get("tokenizer_class"),
                "legacy": config.get("legacy"), "add_prefix_space": config.get("add_prefix_space"),
                "eos_ids": _ids(_json_file(directory, "generation_config.json").get("eos_token_id"))
                or _ids(_json_file(directory, "config.json").get("eos_token_id")) or None}
    return {name: value for name, value in settings.items() if value is not None}


class TokenizerWarning(Notice):
    """A checkpoint read without a tokenizer that it may have wanted."""


def _json_file(directory, name):
    """A JSON object file of the directory ({} when absent)."""
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as file:
            data = json.load(file)
    except (ValueError, UnicodeDecodeError) as error:
        raise WeightsError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise WeightsError(f"{path}: not a JSON object")
    return data


def _token_text(token):
    """tokenizer_config.json writes a special token as its text or as {"content": text, ...}."""
    return token.get("content") if isinstance(token, dict) else token


def _ids(value):
    return [value] if isinstance(value, int) else [i for i in value if isinstance(i, int)] if isinstance(value, list) else []


def _chat_template(directory, configured):
    """chat_template.jinja, else chat_template.json, else tokenizer_config.json's (a string, or a list
    of {"name", "template"} of which the one named "default" is the chat template)."""
    jinja = os.path.join(directory, "chat_template.jinja")
    if os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as file:
            return file.read()
    configured = _json_file(directory, "chat_template.json").get("chat_template", configured)
    if isinstance(configured, list):
        named = {entry.get("name"): entry.get("template") for entry in configured if isinstance(entry, dict)}
        configured = named.get("default")
    return configured if isinstance(configured, str) else None
