"""Meta's original checkpoints: params.json; consolidated.00.pth (.01, .02 … for 13B and up: model-parallel
shards, each tensor split along the axis its layer is parallel on), read without torch (torch_pickle.py);
tokenizer.model. q and k rows are stored in RoPE's interleaved-pair order and permuted to HF's on import
(rope.from_pairs); tensors are joined and permuted one at a time, when read (LazyTensors)."""
import json
import os

import numpy as np

from ..config import EMBEDDING, FINAL_NORM, LM_HEAD, ConfigError, LlamaConfig, block_param_name
from ..ops import rope
from . import torch_pickle
from .common import LazyTensors, WeightsError, directory_tokenizer

# How Meta's model parallelism splits each tensor across consolidated.NN.pth (llama/model.py):
# ColumnParallelLinear splits the output rows (axis 0), RowParallelLinear the input columns (axis 1),
# ParallelEmbedding the embedding dimension (axis 1); norms are copied into every shard.
NAMES = {  # HF short name -> (Meta name under "layers.{i}.", axis the shards are joined on)
    "input_layernorm": ("attention_norm.weight", None),
    "q_proj": ("attention.wq.weight", 0), "k_proj": ("attention.wk.weight", 0),
    "v_proj": ("attention.wv.weight", 0), "o_proj": ("attention.wo.weight", 1),
    "post_attention_layernorm": ("ffn_norm.weight", None),
    "gate_proj": ("feed_forward.w1.weight", 0), "down_proj": ("feed_forward.w2.weight", 1),
    "up_proj": ("feed_forward.w3.weight", 0),
}
TOP = {EMBEDDING: ("tok_embeddings.weight", 1), FINAL_NORM: ("norm.weight", None),
       LM_HEAD: ("output.weight", 0)}
DEFAULT_CONTEXT = 4096  # params.json does not say; Llama 2's context (LLaMA 1: 2048)


def read(directory):
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
    tokenizer = directory_tokenizer(directory)
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
    names = {hf: meta for hf, meta in TOP.items() if hf != LM_HEAD or not config.tie_word_embeddings}
    for layer in range(config.num_hidden_layers):
        for short, (meta_name, axis) in NAMES.items():
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
        if meta.get("use_scaled_rope"):  # Llama 3.1's published constants (3.2 gives its factor, 32)
            scaling = {"rope_type": "llama3", "factor": float(meta.get("rope_scaling_factor") or 8.0),
                       "low_freq_factor": 1.0,
                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        return LlamaConfig(vocab_size=embedding.shape[0], hidden_size=meta["dim"], intermediate_size=ffn_rows,
                           num_hidden_layers=meta["n_layers"], num_attention_heads=heads,
                           num_key_value_heads=meta.get("n_kv_heads") or heads,
                           rms_norm_eps=meta.get("norm_eps", 1e-5), rope_theta=meta.get("rope_theta", 10000.0),
                           rope_scaling=scaling,
                           max_position_embeddings=meta.get("max_seq_len", DEFAULT_CONTEXT),
                           tie_word_embeddings="output.weight" not in shards[0])
    except KeyError as error:
        raise WeightsError(f"{path}: missing {error.args[0]} (in params.json or the checkpoint)") from None
    except ConfigError as error:
        raise WeightsError(f"{path}: {error}") from None
