"""HF transformers checkpoint directories: read (config.json; model.safetensors, or the shards that
model.safetensors.index.json lists; tokenizer.model when present), and written back (export)."""
import json
import os

from .. import dtypes
from . import files, safetensors_file, tokenizer as tokenizers
from .common import WeightsError, config_from_json, host_tensors, optional_tokenizer, read_safetensors


def read(directory):
    config_path = os.path.join(directory, "config.json")
    with open(config_path) as file:
        config = config_from_json(config_path, file.read())
    params = {}
    for shard in _hf_shards(directory):
        params.update(read_safetensors(shard)[1])
    return config, params, optional_tokenizer(directory)


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


def export(directory, config, params, tokenizer=None):
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
    safetensors_file.write(os.path.join(directory, "model.safetensors"), host_tensors(config, params),
                           {"format": "pt"})
    files.write_atomically(os.path.join(directory, "config.json"), [json.dumps(hf_config, indent=2).encode()])
    tokenizer_path = os.path.join(directory, "tokenizer.model")
    if isinstance(tokenizer, tokenizers.SentencePieceTokenizer):
        files.write_atomically(tokenizer_path, [tokenizer.model_bytes])
    elif os.path.exists(tokenizer_path):  # an earlier export's: it does not belong to this model
        os.remove(tokenizer_path)
