"""LlamaConfig: the model's hyper-parameters, named as in HF transformers' config.json, presets, and the
names and shapes of the parameters a config calls for (HF transformers' names and (out, in) layouts)."""
import dataclasses
import math
from dataclasses import dataclass, field

from .errors import UserError

ROPE_SCALING_TYPES = ("linear", "llama3")

EMBEDDING = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"
# A block's parameters: short name -> name under "model.layers.{i}."
BLOCK_PARAMS = {
    "input_layernorm": "input_layernorm.weight",
    "q_proj": "self_attn.q_proj.weight",
    "k_proj": "self_attn.k_proj.weight",
    "v_proj": "self_attn.v_proj.weight",
    "o_proj": "self_attn.o_proj.weight",
    "post_attention_layernorm": "post_attention_layernorm.weight",
    "gate_proj": "mlp.gate_proj.weight",
    "up_proj": "mlp.up_proj.weight",
    "down_proj": "mlp.down_proj.weight",
}


class ConfigError(UserError):
    """A configuration that cannot describe a Llama model (message is one line, fit for the user)."""


@dataclass
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int = None  # None means the same as num_attention_heads (no GQA)
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict = None  # None, {"rope_type": "linear", "factor"} or llama3's four fields
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    _extra: dict = field(default_factory=dict, repr=False, compare=False)  # unknown config.json keys

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        self.validate()

    @property
    def head_dim(self):
        return self.hidden_size // self.num_attention_heads

    def validate(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"num_attention_heads ({self.num_attention_heads}) must divide "
                              f"hidden_size ({self.hidden_size})")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_key_value_heads ({self.num_key_value_heads}) must divide "
                              f"num_attention_heads ({self.num_attention_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head dim hidden_size/num_attention_heads = {self.head_dim} must be "
                              "even: RoPE rotates pairs of features")
        for name in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"{name} must be a positive number, got {value!r}")
        if not isinstance(self.tie_word_embeddings, bool):
            raise ConfigError(f"tie_word_embeddings must be true or false, got {self.tie_word_embeddings!r}")
        self._validate_rope_scaling()

    def _validate_rope_scaling(self):
        scaling = self.rope_scaling
        if scaling is None:
            return
        if not isinstance(scaling, dict):
            raise ConfigError(f"rope_scaling must be a mapping or null, got {scaling!r}")
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind == "default":
            return
        if kind not in ROPE_SCALING_TYPES:
            raise ConfigError(f"rope_scaling type {kind!r} is not supported; "
                              f"supported: {', '.join(ROPE_SCALING_TYPES)}")
        needed = ["factor"]
        if kind == "llama3":
            needed += ["low_freq_factor", "high_freq_factor", "original_max_position_embeddings"]
        for key in needed:
            value = scaling.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"rope_scaling[{key!r}] must be a positive number, got {value!r}")

    # ---- dict (config.json) round trip -------------------------------------------------------------
    @classmethod
    def from_dict(cls, data):
        """Build from a config.json-like dict; keys this model does not use are kept, not validated."""
        if not isinstance(data, dict):
            raise ConfigError(f"a config must be a JSON object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls) if not f.name.startswith("_")}
        missing = [n for n in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if n not in data]
        if missing:
            raise ConfigError(f"config is missing {', '.join(missing)}")
        known = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names}
        # transformers >= 5 writes rope_theta and rope_scaling together as "rope_parameters"
        rope_parameters = dict(extra.pop("rope_parameters", None) or {})
        known.setdefault("rope_theta", rope_parameters.pop("rope_theta", 10000.0))
        if known.get("rope_scaling") is None and rope_parameters.get("rope_type", "default") != "default":
            known["rope_scaling"] = rope_parameters
        head_dim = extra.get("head_dim")
        if head_dim is not None and head_dim * known["num_attention_heads"] != known["hidden_size"]:
            raise ConfigError(f"head_dim {head_dim} != hidden_size / num_attention_heads; "
                              "only the standard head size is supported")
        return cls(**known, _extra=extra)

    def to_dict(self):
        """The config.json fields (unknown keys read by from_dict are written back unchanged)."""
        data = dict(self._extra)
        data.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                     if not f.name.startswith("_")})
        return data

    # ---- sizes and presets ------------------------------------------------------------------------
    def num_parameters(self):
        """Number of parameters (tied embeddings counted once)."""
        d, kv_dim = self.hidden_size, self.num_key_value_heads * self.head_dim
        attention = 2 * d * d + 2 * d * kv_dim
        mlp = 3 * d * self.intermediate_size
        per_layer = attention + mlp + 2 * d
        embeddings = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * per_layer + embeddings + d

    @classmethod
    def preset(cls, name):
        """A named configuration; see PRESETS for the names."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
        return cls(**PRESETS[name])


def block_param_name(layer, short_name):
    return f"model.layers.{layer}.{BLOCK_PARAMS[short_name]}"


def parameter_shapes(config):
    """name -> shape of every parameter the config calls for, in HF order."""
    d, f, kv = config.hidden_size, config.intermediate_size, config.num_key_value_heads * config.head_dim
    block = {"input_layernorm": (d,), "q_proj": (d, d), "k_proj": (kv, d), "v_proj": (kv, d),
             "o_proj": (d, d), "post_attention_layernorm": (d,), "gate_proj": (f, d),
             "up_proj": (f, d), "down_proj": (d, f)}
    shapes = {EMBEDDING: (config.vocab_size, d)}
    for layer in range(config.num_hidden_layers):
        shapes.update({block_param_name(layer, short): shape for short, shape in block.items()})
    shapes[FINAL_NORM] = (d,)
    if not config.tie_word_embeddings:
        shapes[LM_HEAD] = (config.vocab_size, d)
    return shapes


def _llama(dim, layers, heads, hidden, kv_heads=None, vocab=32000, context=2048, eps=1e-5, **rest):
    return dict(vocab_size=vocab, hidden_size=dim, intermediate_size=hidden, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads or heads,
                max_position_embeddings=context, rms_norm_eps=eps, **rest)


# llama2.c's TinyStories models share the classifier with the token embedding.
PRESETS = {
    "tiny": _llama(32, 2, 4, 64, kv_heads=2, vocab=64, context=64),
    "shakespeare-char": _llama(128, 4, 4, 384, vocab=65, context=64),  # nanoGPT's CPU recipe, as a Llama
    "stories260K": _llama(64, 5, 8, 172, kv_heads=4, vocab=512, context=512, tie_word_embeddings=True),
    "stories15M": _llama(288, 6, 6, 768, context=256, tie_word_embeddings=True),
    "stories42M": _llama(512, 8, 8, 1376, context=1024, tie_word_embeddings=True),
    "stories110M": _llama(768, 12, 12, 2048, context=1024, tie_word_embeddings=True),
    "tinyllama-1.1b": _llama(2048, 22, 32, 5632, kv_heads=4),
    "smollm-135m": _llama(576, 30, 9, 1536, kv_heads=3, vocab=49152, tie_word_embeddings=True),
    "llama1-7b": _llama(4096, 32, 32, 11008, eps=1e-6),
    "llama1-13b": _llama(5120, 40, 40, 13824, eps=1e-6),
    "llama1-33b": _llama(6656, 60, 52, 17920, eps=1e-6),
    "llama1-65b": _llama(8192, 80, 64, 22016, eps=1e-6),
    "llama2-7b": _llama(4096, 32, 32, 11008, context=4096),
    "llama2-13b": _llama(5120, 40, 40, 13824, context=4096),
    "llama2-70b": _llama(8192, 80, 64, 28672, kv_heads=8, context=4096),
}


def human_count(n):
    """12345678 -> '12.3M'."""
    if n < 1000:
        return str(n)
    exponent = min(int(math.log10(n) // 3), 4)
    return f"{n / 1000 ** exponent:.3g}{' KMBT'[exponent]}"


def human_bytes(size):
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.4g} {unit}"
        size /= 1024
    return f"{size:.4g} TiB"


def human_duration(seconds):
    """95 -> '1m35s'; 4000 -> '1h06m'."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
