"""Weights that are not trained: frozen, or frozen with a LoRA adapter (Hu et al., 2021) that is.

A parameter's role travels with its value:
    an array W              trained: the model returns its gradient
    Frozen(W)               frozen: no gradient and no weight-gradient product; dx still flows through W
    Adapted(W, A, B, s)     W frozen, with an adapter of rank r whose A: (r, in) and B: (out, r) are trained:
                            y = x Wᵀ + s·(x Aᵀ) Bᵀ, s = alpha / r (the delta and its backward: ops/lora.py)
Both are weights of the product seam (ops/linear.py): they multiply and back-propagate for themselves,
so no op knows they exist. Where a frozen value is used other than in a product (a norm's scale, the
embedding's rows), the model reads `values`. W may itself be a weight object (runtime/streamed.py).
B starts at zero, so a new adapter changes nothing until it is trained; A is drawn at random (seeded),
so B's gradient is not zero. Merging: W' = W + s·B A computes the same y without an adapter.
An adapter's tensors are named as PEFT names them, less its prefix: ...q_proj.lora_A.weight and
...q_proj.lora_B.weight beside ...q_proj.weight.
"""
import numpy as np

from . import backend
from .config import block_param_name
from .errors import UserError
from .ops import linear, lora

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
A_NAME, B_NAME = "lora_A.weight", "lora_B.weight"  # under the adapted weight's name, less ".weight"


class Frozen:
    """A weight that gets no gradient."""

    def __init__(self, values):
        self.values = values

    @property
    def shape(self):
        return self.values.shape

    @property
    def dtype(self):
        return self.values.dtype

    def forward(self, x):
        return linear.product(x, self.values), None

    def backward(self, dy, cache):
        return linear.input_grad(dy, self.values), None

    @property
    def adapted(self):
        return False

    def converted(self, convert, matrix):
        """The same role around convert(values, matrix) (to compute with: generation.py, model.py)."""
        return Frozen(linear.converted(self.values, convert, matrix))


class Adapted(Frozen):
    """A frozen weight with a trained LoRA adapter; backward's gradient is {A_NAME: dA, B_NAME: dB}."""

    def __init__(self, values, a, b, scale):
        super().__init__(values)
        self.a, self.b, self.scale = a, b, scale

    def forward(self, x):
        y = linear.product(x, self.values)
        delta, cache = lora.forward(x, self.a, self.b, self.scale)
        y += delta
        return y, cache

    def backward(self, dy, cache):
        dx = linear.input_grad(dy, self.values)
        dx_delta, da, db = lora.backward(dy, cache)
        dx += dx_delta
        return dx, {A_NAME: da, B_NAME: db}

    @property
    def adapted(self):
        return True

    def converted(self, convert, matrix):
        return Adapted(linear.converted(self.values, convert, matrix), convert(self.a, False), convert(self.b, False),
                       self.scale)

    def merged(self):
        """W + s · B A: the plain weight that computes what this one does (a quantized W widened)."""
        weight = self.values if backend.is_array(self.values) else self.values.dequantized()
        return weight + (self.b @ self.a) * self.scale


# ---- adapters on a model's parameters -----------------------------------------------------------------
def adapter_names(weight_name):
    """The names of an adapter's A and B for a weight: model.layers.0.self_attn.q_proj.weight ->
    model.layers.0.self_attn.q_proj.lora_A.weight and ...lora_B.weight."""
    stem = weight_name[:-len(".weight")]
    return f"{stem}.{A_NAME}", f"{stem}.{B_NAME}"


def split(arrays):
    """(base, adapters): the arrays that are adapters' A and B (by their names), and the others."""
    is_adapter = {name: name.endswith((f".{A_NAME}", f".{B_NAME}")) for name in arrays}
    return ({name: value for name, value in arrays.items() if not is_adapter[name]},
            {name: value for name, value in arrays.items() if is_adapter[name]})


def with_adapters(arrays, scale):
    """The model's parameters from what a run holds: the arrays themselves when scale is None (no LoRA),
    else the frozen base among them with the adapters among them attached at this scale."""
    if scale is None:
        return arrays
    base, adapters = split(arrays)
    if not adapters:
        raise ValueError("a LoRA scale was given, but there are no adapters among the arrays")
    return attach(base, adapters, scale)


def check_targets(targets):
    """UserError (one line) unless targets is a non-empty collection of TARGETS names."""
    unknown = [name for name in targets if name not in TARGETS]
    if unknown or not targets:
        raise UserError(f"LoRA targets must be among {', '.join(TARGETS)}; got {', '.join(targets) or 'none'}")


def init_adapters(params, config, targets, rank, alpha, seed):
    """New adapters, name -> array (A and B under adapter_names), for the projections named in targets
    (e.g. ("q_proj", "v_proj")) of every layer, on each weight's device and in its dtype:
    A ~ N(0, 1/r) seeded, B = 0. (alpha only scales: s = alpha / r, given to attach.)"""
    check_targets(targets)
    rng = np.random.default_rng(seed)
    adapters = {}
    for layer in range(config.num_hidden_layers):
        for short in TARGETS:
            if short in targets:
                name = block_param_name(layer, short)
                weight = params[name]
                xp = backend.array_module(weight)
                dtype = weight.dtype if weight.dtype.kind == "f" else np.float32
                name_a, name_b = adapter_names(name)
                a = rng.standard_normal((rank, weight.shape[1])) / np.sqrt(rank)
                adapters[name_a] = xp.asarray(a, dtype=dtype)
                adapters[name_b] = xp.zeros((weight.shape[0], rank), dtype=dtype)
    return adapters


def attach(params, adapters, scale):
    """params with every weight frozen, the adapted ones carrying their adapter (the same A and B
    arrays: an optimizer updating adapters in place updates the model)."""
    attached = {}
    for name, weight in params.items():
        name_a, name_b = adapter_names(name) if name.endswith(".weight") else (None, None)
        if name_a in adapters:
            attached[name] = Adapted(weight, adapters[name_a], adapters[name_b], scale)
        else:
            attached[name] = Frozen(weight)
    return attached


def merge(params, adapters, scale):
    """Plain parameters computing what params with these adapters compute: W' = W + s·B A."""
    return {name: weight.merged() if isinstance(weight, Adapted) else weight.values
            for name, weight in attach(params, adapters, scale).items()}
