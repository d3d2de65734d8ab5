import pytest

from npllama.config import PRESETS, ConfigError, LlamaConfig

# meta-llama/Llama-2-7b-hf's config.json as published (transformers 4.x field names)
LLAMA2_7B_HF = {
    "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 11008,
    "max_position_embeddings": 4096, "model_type": "llama", "num_attention_heads": 32,
    "num_hidden_layers": 32, "num_key_value_heads": 32, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": None, "tie_word_embeddings": False, "torch_dtype": "float16",
    "transformers_version": "4.31.0.dev0", "use_cache": True, "vocab_size": 32000,
}


def test_hf_config_json_reads_as_the_preset():
    assert LlamaConfig.from_dict(LLAMA2_7B_HF) == LlamaConfig.preset("llama2-7b")


def test_round_trip_keeps_unknown_keys():
    config = LlamaConfig.from_dict(LLAMA2_7B_HF)
    data = config.to_dict()
    assert {k: v for k, v in data.items() if k in LLAMA2_7B_HF} == LLAMA2_7B_HF
    assert LlamaConfig.from_dict(data) == config


def test_transformers_5_rope_parameters():
    data = dict(LLAMA2_7B_HF, rope_scaling=None, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    config = LlamaConfig.from_dict(data)
    assert config.rope_theta == 500000.0
    assert config.rope_scaling == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


# Parameter counts as published for the released checkpoints.
@pytest.mark.parametrize("name, count", [
    ("llama2-7b", 6_738_415_616), ("llama2-13b", 13_015_864_320), ("llama2-70b", 68_976_648_192),
    ("llama1-33b", 32_528_943_616), ("llama1-65b", 65_285_660_672),
    ("tinyllama-1.1b", 1_100_048_384), ("smollm-135m", 134_515_008),
])
def test_preset_parameter_counts(name, count):
    assert LlamaConfig.preset(name).num_parameters() == count


def test_presets_shapes():
    assert LlamaConfig.preset("llama1-33b").num_attention_heads == 52
    smol = LlamaConfig.preset("smollm-135m")
    assert (smol.hidden_size, smol.num_hidden_layers, smol.num_attention_heads, smol.num_key_value_heads,
            smol.tie_word_embeddings) == (576, 30, 9, 3, True)
    stories = LlamaConfig.preset("stories15M")
    assert (stories.hidden_size, stories.num_hidden_layers, stories.intermediate_size) == (288, 6, 768)
    assert len(PRESETS) >= 15


@pytest.mark.parametrize("change, message", [
    ({"num_attention_heads": 5}, "num_attention_heads (5) must divide hidden_size (64)"),
    ({"num_key_value_heads": 3}, "num_key_value_heads (3) must divide num_attention_heads (4)"),
    ({"hidden_size": 36, "num_attention_heads": 4}, "head dim hidden_size/num_attention_heads = 9 must be even"),
    ({"vocab_size": 0}, "vocab_size must be a positive integer"),
    ({"num_hidden_layers": 2.5}, "num_hidden_layers must be a positive integer"),
    ({"rms_norm_eps": -1.0}, "rms_norm_eps must be a positive number"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "rope_scaling type 'yarn' is not supported"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling['low_freq_factor']"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings must be true or false"),
])
def test_validation_errors(change, message):
    fields = dict(vocab_size=10, hidden_size=64, intermediate_size=100, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)
    fields.update(change)
    with pytest.raises(ConfigError) as error:
        LlamaConfig(**fields)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_from_dict_errors():
    with pytest.raises(ConfigError, match="missing hidden_size"):
        LlamaConfig.from_dict({k: v for k, v in LLAMA2_7B_HF.items() if k != "hidden_size"})
    with pytest.raises(ConfigError, match="head_dim 64 != hidden_size / num_attention_heads"):
        LlamaConfig.from_dict(dict(LLAMA2_7B_HF, head_dim=64))
    with pytest.raises(ConfigError, match="unknown preset 'llama9'"):
        LlamaConfig.preset("llama9")


def test_defaults():
    config = LlamaConfig(vocab_size=10, hidden_size=8, intermediate_size=4, num_hidden_layers=1,
                         num_attention_heads=2)
    assert config.num_key_value_heads == 2 and config.head_dim == 4 and config.rope_scaling is None
