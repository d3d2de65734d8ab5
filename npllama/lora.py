"""LoRA (Hu et al., 2021): a frozen weight plus a trainable low-rank update, and frozen weights in general.

A projection's weight takes one of three roles (linear.py dispatches on them):
    an array W                     trained: backward returns dW
    Frozen(W)                      frozen: no gradient buffer, no weight-gradient product; dx still
                                   flows through W
    Frozen(W, a=A, b=B, scale=s)   frozen, with an adapter of rank r whose A and B are trained
The adapter branch, for x: (..., in), W: (out, in), A: (r, in), B: (out, r), s = alpha / r:
Forward:   u = x Aᵀ                                       u: (..., r)
           y = x Wᵀ + s · u Bᵀ                            y: (..., out)
Backward:  dB = s · Σ_rows dyᵀ u                          dB: (out, r)
           du = s · dy B                                  du: (..., r)
           dA = Σ_rows duᵀ x                              dA: (r, in)
           dx = dy W + du A
B starts at zero, so an adapter changes nothing until it is trained; A is drawn at random (seeded),
so B's gradient is not zero. Merging: W' = W + s · B A gives the same y with no adapter.
"""
import dataclasses

import numpy as np

from . import backend

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass
class Frozen:
    """A weight that gets no gradient, optionally with a LoRA adapter (a: (r, in), b: (out, r))."""
    weight: object
    a: object = None
    b: object = None
    scale: float = 0.0

    @property
    def adapted(self):
        return self.a is not None

    @property
    def shape(self):
        return self.weight.shape


@dataclasses.dataclass
class AdapterGrad:
    """The gradient of a Frozen weight's adapter: dA (r, in), dB (out, r)."""
    a: object
    b: object


def base(weight):
    """The array a projection multiplies by, whatever its role."""
    return weight.weight if isinstance(weight, Frozen) else weight


def _rows(array):
    return array.reshape(-1, array.shape[-1])


def delta_forward(x, a, b, scale):
    """The adapter's term s · (x Aᵀ) Bᵀ: (..., out), and its cache."""
    u = _rows(x) @ a.T
    y = (u @ b.T) * scale
    return y.reshape(*x.shape[:-1], b.shape[0]), (x, u, a, b, scale)


def delta_backward(dy, cache):
    """Returns dx (the adapter's share of it), dA, dB."""
    x, u, a, b, scale = cache
    dy_rows = _rows(dy)
    db = (dy_rows.T @ u) * scale
    du = (dy_rows @ b) * scale
    da = du.T @ _rows(x)
    return (du @ a).reshape(x.shape), da, db


def new_adapter(weight, rank, alpha, rng):
    """Frozen(weight) with A ~ N(0, 1/r) (seeded, on the weight's device) and B = 0. The scale is
    alpha / r."""
    xp = backend.array_module(weight)
    dtype = weight.dtype if weight.dtype.kind == "f" else np.float32
    a = rng.standard_normal((rank, weight.shape[1])) / np.sqrt(rank)
    return Frozen(weight, a=xp.asarray(a, dtype=dtype), b=xp.zeros((weight.shape[0], rank), dtype=dtype),
                  scale=alpha / rank)


def merged(weight):
    """W + s · B A: the plain weight that computes what a Frozen weight with an adapter computes."""
    if not isinstance(weight, Frozen) or not weight.adapted:
        return base(weight)
    return base(weight) + (weight.b @ weight.a) * weight.scale


# ---- adapters on a model's parameters -----------------------------------------------------------------
def adapter_names(weight_name):
    """The names of an adapter's A and B for a weight: model.layers.0.self_attn.q_proj.weight ->
    model.layers.0.self_attn.q_proj.lora_A.weight and ...lora_B.weight (PEFT's names, less its prefix)."""
    stem = weight_name[:-len(".weight")]
    return f"{stem}.lora_A.weight", f"{stem}.lora_B.weight"


def named_grads(grads):
    """grads by parameter name (arrays, None for frozen, AdapterGrad for adapted) -> a flat dict of the
    trained tensors' gradients: the plain ones, and each adapter's A and B under adapter_names."""
    flat = {}
    for name, grad in grads.items():
        if isinstance(grad, AdapterGrad):
            name_a, name_b = adapter_names(name)
            flat[name_a], flat[name_b] = grad.a, grad.b
        elif grad is not None:
            flat[name] = grad
    return flat


def check_targets(targets):
    """ValueError (one line) unless targets is a non-empty collection of TARGETS names."""
    unknown = [name for name in targets if name not in TARGETS]
    if unknown or not targets:
        raise ValueError(f"LoRA targets must be among {', '.join(TARGETS)}; got {', '.join(targets) or 'none'}")


def init_adapters(params, config, targets, rank, alpha, seed):
    """New adapters, name -> array (A and B under adapter_names), for the projections named in targets
    (e.g. ("q_proj", "v_proj")) of every layer. A ~ N(0, 1/r) seeded; B = 0."""
    from .model import block_param_name  # the model composes lora, not the other way round
    check_targets(targets)
    rng = np.random.default_rng(seed)
    adapters = {}
    for layer in range(config.num_hidden_layers):
        for short in TARGETS:
            if short in targets:
                name = block_param_name(layer, short)
                frozen = new_adapter(params[name], rank, alpha, rng)
                name_a, name_b = adapter_names(name)
                adapters[name_a], adapters[name_b] = frozen.a, frozen.b
    return adapters


def attach(params, adapters, scale):
    """params with every weight frozen, the adapted ones carrying their adapter (the same A and B
    arrays: an optimizer updating adapters in place updates the model)."""
    attached = {}
    for name, weight in params.items():
        name_a, name_b = adapter_names(name) if name.endswith(".weight") else (None, None)
        if name_a in adapters:
            attached[name] = Frozen(weight, a=adapters[name_a], b=adapters[name_b], scale=scale)
        else:
            attached[name] = Frozen(weight)
    return attached


def merge(params, adapters, scale):
    """Plain parameters computing what params with these adapters compute: W' = W + s·B A."""
    return {name: merged(weight) for name, weight in attach(params, adapters, scale).items()}
