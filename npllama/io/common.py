"""What the checkpoint formats share: WeightsError, tensors made when read (LazyTensors), and
reading the pieces a checkpoint is made of (safetensors, config JSON, tokenizer) with one-line errors."""
import collections.abc
import json
import os

from .. import backend, dtypes
from ..config import ConfigError, LlamaConfig, parameter_shapes
from ..errors import UserError
from . import safetensors_file, tokenizer as tokenizers


class WeightsError(UserError):
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


def host_tensors(config, params, dtype=None):
    """The config's tensors, each moved to the host (and converted to dtype) only when it is written."""
    tensors = LazyTensors()
    for name in parameter_shapes(config):
        stored, shape = safetensors_file.dtype_and_shape(params, name)
        tensors.add(name, dtype or stored, shape,
                    lambda name=name: dtypes.convert(backend.to_host(params[name]), dtype or stored))
    return tensors


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


def read_tokenizer(path):
    try:
        return tokenizers.load(path)
    except OSError as error:
        raise WeightsError(f"{path}: cannot read the tokenizer ({error.strerror})") from None


def optional_tokenizer(directory):
    path = os.path.join(directory, "tokenizer.model")
    return read_tokenizer(path) if os.path.isfile(path) else None
