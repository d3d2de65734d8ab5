"""HF transformers checkpoint directories: read (config.json; model.safetensors, or the shards that
model.safetensors.index.json lists; the tokenizer: tokenizer.json or tokenizer.model, with
tokenizer_config.json, chat_template.jinja and generation_config.json), and written back (export)."""
import json
import os

from .. import dtypes
from . import files, safetensors_file
from .common import WeightsError, config_from_json, host_tensors, directory_tokenizer, read_safetensors


def read(directory):
    config_path = os.path.join(directory, "config.json")
    with open(config_path) as file:
        config = config_from_json(config_path, file.read())
    params = {}
    for shard in _hf_shards(directory):
        params.update(read_safetensors(shard)[1])
    return config, params, directory_tokenizer(directory)


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


def export(directory, config, params, tokenizer=None, on_tensor=lambda done, total: None):
    """Write an HF transformers checkpoint directory that LlamaForCausalLM.from_pretrained and
    AutoTokenizer.from_pretrained load: config.json, model.safetensors and the tokenizer's files
    (tokenizer.model or tokenizer.json, tokenizer_config.json, generation_config.json). HF has no
    format for a character vocabulary: it is left out, nor for quantized blocks: a model that holds any
    is written in float32, which holds their values exactly. Returns the names of the files written.
    on_tensor(done, total) as each tensor is made to be written."""
    os.makedirs(directory, exist_ok=True)
    stored = {safetensors_file.dtype_and_shape(params, name)[0] for name in params}
    dtype = "fp32" if any(dtypes.is_quantized(kind) for kind in stored) else None
    stored = {dtypes.name(dtype or kind) for kind in stored}
    torch_dtype = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "fp64": "float64"}
    hf_config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
                 "torch_dtype": torch_dtype[stored.pop()] if len(stored) == 1 else "float32",
                 **config.to_dict()}
    if hf_config.get("rope_scaling") is None:
        del hf_config["rope_scaling"]
    written = _tokenizer_files(tokenizer) if tokenizer is not None and tokenizer.kind != "char" else {}
    if written:
        hf_config.update(bos_token_id=tokenizer.bos_id, eos_token_id=_one_or_list(tokenizer.eos_ids))
    safetensors_file.write(os.path.join(directory, "model.safetensors"), host_tensors(config, params, dtype, on_tensor),
                           {"format": "pt"})
    _write_json(os.path.join(directory, "config.json"), hf_config)
    for name in TOKENIZER_FILES:  # an earlier export's files do not belong to this model
        path = os.path.join(directory, name)
        if name in written:
            files.write_atomically(path, [written[name]])
        elif os.path.exists(path):
            os.remove(path)
    return ["config.json", "model.safetensors", *written]


TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
                   "chat_template.jinja")


def _tokenizer_files(tokenizer):
    """File name -> bytes of the tokenizer as transformers reads it."""
    def text(token_id):
        return tokenizer.token_text(token_id) if token_id is not None else None
    config = {"bos_token": text(tokenizer.bos_id), "eos_token": text(tokenizer.eos_id),
              "add_bos_token": tokenizer.add_bos, "add_eos_token": False}
    if tokenizer.chat_template is not None:
        config["chat_template"] = tokenizer.chat_template
    generation = {"bos_token_id": tokenizer.bos_id, "eos_token_id": _one_or_list(tokenizer.eos_ids)}
    if tokenizer.kind == "sentencepiece":
        model = {"tokenizer.model": tokenizer.model_bytes}
        config.update(tokenizer_class="LlamaTokenizer", legacy=tokenizer.legacy, unk_token=text(tokenizer.unk_id))
    else:
        model = {"tokenizer.json": tokenizer.json.encode("utf-8")}
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    return {**model, "tokenizer_config.json": _json_bytes(config), "generation_config.json": _json_bytes(generation)}


def _one_or_list(ids):
    return ids[0] if len(ids) == 1 else list(ids) if ids else None


def _json_bytes(data):
    return json.dumps({key: value for key, value in data.items() if value is not None}, indent=2,
                      ensure_ascii=False).encode("utf-8")


def _write_json(path, data):
    files.write_atomically(path, [_json_bytes(data)])
