"""AdamW (Loshchilov & Hutter, 2019), the learning-rate schedule and gradient clipping.

AdamW, step t = 1, 2, ... for every parameter p with gradient g (lr may change from step to step):
    p ← p · (1 − lr·λ)                      decoupled weight decay, only where p.ndim ≥ 2 (embeddings,
                                            projections); RMSNorm weights (1-D) are not decayed
    m ← m + (1 − β1)·(g − m)                = β1·m + (1 − β1)·g, the first moment
    v ← β2·v + ((1 − β2)·g)·g               the second moment
    d ← √v / √(1 − β2^t) + ε                bias-corrected RMS of the gradient, plus ε
    p ← p + (−lr / (1 − β1^t)) · m / d      the bias-corrected step
m and v start at 0, created on the first step with the parameter's dtype and device. The bias
corrections are computed in float64 (Python floats) and every per-element operation in the
parameter's dtype, in the order written above: it is torch.optim.AdamW's single-tensor path
(foreach=False), operation for operation: torch's lerp_ for m, mul_ then addcmul_ for v,
sqrt()/√bc2 + ε, then addcdiv_. (On the CPU, torch fuses m's lerp and v's addcmul into one
multiply-add each, rounding once where this rounds twice: the first step agrees bit for bit, later
ones to a fraction of the largest weights' last place, 4e-8 of max |p| over the 25 steps of the test.)

Schedule (nanoGPT's get_lr): linear warmup over `warmup` steps, then a half cosine from max_lr down to
min_lr at `decay_iters`, then min_lr:
    step < warmup:            lr = max_lr · (step + 1) / (warmup + 1)
    step > decay_iters:       lr = min_lr
    otherwise:                r = (step − warmup) / (decay_iters − warmup)
                              lr = min_lr + ½·(1 + cos(π·r)) · (max_lr − min_lr)
With decay_iters <= warmup there is no span to decay over: min_lr from step `warmup` on.

Clipping (torch.nn.utils.clip_grad_norm_): with the global norm ‖g‖ = √(Σ over every grad of Σ g²),
every grad is scaled by min(1, max_norm / (‖g‖ + 1e-6)).

On the CPU the update runs over slices of CHUNK elements, so its dozen passes over a slice find it in
the cache instead of streaming each whole tensor from memory a dozen times; on a GPU each op runs
over the whole tensor at once.
"""
import math

import numpy as np

from . import backend

CHUNK = 1 << 15  # elements per slice of a CPU update: its six float32 arrays fit in a core's L2 cache
CLIP_EPS = 1e-6  # added to the norm before dividing, as torch.nn.utils.clip_grad_norm_ does


class AdamW:
    """AdamW with decoupled weight decay on 2-D parameters. Parameters and grads are dicts
    name -> array (NumPy or CuPy); `step` updates the parameter arrays in place."""

    def __init__(self, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        self.lr = _check_lr(lr)
        beta1, beta2 = (float(beta) for beta in betas)
        if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
            raise ValueError(f"betas must lie in [0, 1), got {tuple(betas)}")
        if not (math.isfinite(eps) and eps >= 0.0):
            raise ValueError(f"eps must be a finite number >= 0, got {eps}")
        if not (math.isfinite(weight_decay) and weight_decay >= 0.0):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay}")
        self.betas = (beta1, beta2)
        self.eps = float(eps)
        self.weight_decay = float(weight_decay)
        self.steps = 0          # steps taken: t of the last step
        self.m, self.v = {}, {}  # name -> first and second moment, like the parameter

    def step(self, params, grads, lr=None, decayed=None):
        """One AdamW step: updates every parameter that has a grad, in place (a parameter without a
        grad, or with None, is left as it is). lr overrides self.lr for this step only. decayed: the
        names that are decayed (default: those of parameters with ndim ≥ 2; pieces of parameters,
        zero.py's, say whose pieces they are)."""
        lr = self.lr if lr is None else _check_lr(lr)
        unknown = [name for name in grads if name not in params]
        if unknown:
            raise KeyError(f"grads for parameters that do not exist: {', '.join(unknown)}")
        pairs = [(name, params[name], grads[name]) for name in params if grads.get(name) is not None]
        for name, param, grad in pairs:  # check everything before changing anything
            if tuple(grad.shape) != tuple(param.shape):
                raise ValueError(f"{name}: grad shape {tuple(grad.shape)} != "
                                 f"parameter shape {tuple(param.shape)}")
            for moments in (self.m, self.v):
                if name in moments and tuple(moments[name].shape) != tuple(param.shape):
                    raise ValueError(f"{name}: optimizer state has shape {tuple(moments[name].shape)}, "
                                     f"the parameter {tuple(param.shape)}")

        self.steps += 1
        beta1, beta2 = self.betas
        bias_correction1 = 1 - beta1 ** self.steps
        bias_correction2 = 1 - beta2 ** self.steps
        step_size = lr / bias_correction1
        bias_correction2_sqrt = bias_correction2 ** 0.5
        scratch = {}  # CPU slices: dtype -> two buffers of CHUNK elements, shared by all parameters
        for name, param, grad in pairs:
            m, v = self._moments(name, param)
            scalar = param.dtype.type  # each coefficient rounded to the parameter's dtype, as torch does
            decays = self.weight_decay and (param.ndim >= 2 if decayed is None else name in decayed)
            coefficients = (scalar(1 - lr * self.weight_decay) if decays else None, scalar(1 - beta1),
                            scalar(beta2), scalar(1 - beta2), scalar(bias_correction2_sqrt), scalar(self.eps),
                            scalar(-step_size))
            _update_in_slices(param, grad.astype(param.dtype, copy=False), m, v, coefficients, scratch)

    def _moments(self, name, param):
        """m and v for this parameter: zeros on its first step; moved and cast to the parameter's device
        and dtype where they came from elsewhere (load_state_dict of host arrays)."""
        xp = backend.array_module(param)
        if name not in self.m:
            self.m[name] = xp.zeros(param.shape, dtype=param.dtype)
            self.v[name] = xp.zeros(param.shape, dtype=param.dtype)
        for moments in (self.m, self.v):
            moment = moments[name]
            if backend.array_module(moment) is not xp:
                moment = backend.to_host(moment) if xp is np else xp.asarray(moment)
            if moment.dtype != param.dtype or not moment.flags.c_contiguous:
                moment = xp.ascontiguousarray(moment, dtype=param.dtype)
            moments[name] = moment
        return self.m[name], self.v[name]

    def state_dict(self):
        """A snapshot (the moments are copies): {"step", "m", "v", "lr", "betas", "eps", "weight_decay"}."""
        return {"step": self.steps,
                "m": {name: _copy(array) for name, array in self.m.items()},
                "v": {name: _copy(array) for name, array in self.v.items()},
                "lr": self.lr, "betas": self.betas, "eps": self.eps, "weight_decay": self.weight_decay}

    def load_state_dict(self, state):
        """Restore a state_dict (copying its arrays, which may live on either device): stepping on from
        here gives the same parameters, bit for bit, as never having stopped."""
        missing = {"step", "m", "v", "lr", "betas", "eps", "weight_decay"} - set(state)
        if missing:
            raise KeyError(f"optimizer state lacks {', '.join(sorted(missing))}")
        if set(state["m"]) != set(state["v"]):
            raise ValueError("optimizer state has first and second moments for different parameters")
        steps = int(state["step"])
        if steps < 0 or (steps == 0 and state["m"]):
            raise ValueError(f"optimizer state has step {steps} with {len(state['m'])} moment buffers")
        restored = AdamW(float(state["lr"]), tuple(float(beta) for beta in state["betas"]),
                         float(state["eps"]), float(state["weight_decay"]))  # checks the values
        self.lr, self.betas, self.eps, self.weight_decay = (restored.lr, restored.betas, restored.eps,
                                                            restored.weight_decay)
        self.steps = steps
        self.m = {name: _copy(array) for name, array in state["m"].items()}
        self.v = {name: _copy(array) for name, array in state["v"].items()}


def _update_in_slices(param, grad, m, v, coefficients, scratch):
    """The update of one parameter. On the CPU over flat slices of CHUNK elements (views, so the
    parameter changes in place); whole arrays on a GPU or where the parameter is not contiguous."""
    xp = backend.array_module(param)
    if xp is not np or not param.flags.c_contiguous or param.size <= CHUNK:
        _update(param, grad, m, v, coefficients, xp.empty_like(m), xp.empty_like(m))
        return
    if param.dtype not in scratch:
        scratch[param.dtype] = (np.empty(CHUNK, param.dtype), np.empty(CHUNK, param.dtype))
    buffer1, buffer2 = scratch[param.dtype]
    flat = [array.reshape(-1) for array in (param, grad, m, v)]
    for start in range(0, param.size, CHUNK):
        stop = min(start + CHUNK, param.size)
        _update(*(array[start:stop] for array in flat), coefficients,
                buffer1[:stop - start], buffer2[:stop - start])


def _update(p, g, m, v, coefficients, t1, t2):
    """p, m, v ← one AdamW update of same-shape arrays, in place; t1, t2 are scratch of that shape.
    Coefficients (in p's dtype): decay factor 1 − lr·λ (None: no decay), 1 − β1, β2, 1 − β2,
    √(1 − β2^t), ε, −lr / (1 − β1^t)."""
    decay, one_minus_beta1, beta2, one_minus_beta2, bias_correction2_sqrt, eps, neg_step_size = coefficients
    xp = backend.array_module(p)
    if decay is not None:
        p *= decay                         # p ← p·(1 − lr·λ)
    xp.subtract(g, m, out=t1)              # m ← m + (1 − β1)·(g − m)
    t1 *= one_minus_beta1
    m += t1
    v *= beta2                             # v ← β2·v + ((1 − β2)·g)·g
    xp.multiply(g, one_minus_beta2, out=t1)
    t1 *= g
    v += t1
    xp.sqrt(v, out=t1)                     # d ← √v / √(1 − β2^t) + ε
    t1 /= bias_correction2_sqrt
    t1 += eps
    xp.multiply(m, neg_step_size, out=t2)  # p ← p + (−lr / (1 − β1^t))·m / d
    t2 /= t1
    p += t2


def _copy(array):
    return backend.array_module(array).array(array, copy=True)


def _check_lr(lr):
    lr = float(lr)
    if not (math.isfinite(lr) and lr >= 0.0):
        raise ValueError(f"learning rate must be a finite number >= 0, got {lr}")
    return lr


def learning_rate(step, max_lr, min_lr, warmup, decay_iters):
    """The learning rate for step (0-based): linear warmup, cosine decay to min_lr, then min_lr
    (nanoGPT's get_lr; see the module docstring). With decay_iters <= warmup there is no decay span:
    warmup, then min_lr."""
    if warmup < 0 or decay_iters < 0:
        raise ValueError(f"warmup and decay_iters must be >= 0, got {warmup} and {decay_iters}")
    if step < warmup:
        return max_lr * (step + 1) / (warmup + 1)
    if step > decay_iters or decay_iters <= warmup:
        return min_lr
    ratio = (step - warmup) / (decay_iters - warmup)
    coefficient = 0.5 * (1.0 + math.cos(math.pi * ratio))
    return min_lr + coefficient * (max_lr - min_lr)


def clip_grad_norm(grads, max_norm):
    """The global L2 norm of all grads (a Python float); where it exceeds max_norm, every grad is scaled
    in place by max_norm / (norm + 1e-6). max_norm None or 0: no clipping. A norm that is not finite
    is returned with the grads untouched (the caller decides what to do)."""
    norm = global_norm(grads)
    clip_to(grads, max_norm, norm)
    return norm


def global_norm(grads):
    """‖g‖ = √(Σ over every grad of Σ g²), a Python float (None grads are skipped)."""
    return math.sqrt(sum_of_squares(grads))


def sum_of_squares(grads):
    """Σ over every grad of Σ g², a Python float (one sync a device)."""
    squares = {}  # array module -> each grad's sum of squares, a float64 scalar on that grad's device
    for grad in grads.values():
        if grad is not None:
            xp = backend.array_module(grad)
            squares.setdefault(xp, []).append(_sum_of_squares(grad, xp))
    return sum(float(xp.stack(sums).sum()) for xp, sums in squares.items())


def clip_to(grads, max_norm, norm):
    """Scale every grad in place by max_norm / (norm + 1e-6) where norm (their global norm) exceeds
    max_norm; max_norm None or 0, or a norm that is not finite: nothing changes."""
    if max_norm is not None and not max_norm >= 0:
        raise ValueError(f"max_norm must be >= 0 or None, got {max_norm}")
    if max_norm and math.isfinite(norm):
        scale = max_norm / (norm + CLIP_EPS)
        if scale < 1.0:
            for grad in grads.values():
                if grad is not None:
                    grad *= grad.dtype.type(scale)


def _sum_of_squares(array, xp):
    """Σ array² as a float64 scalar on the array's device. A float32 dot over millions of elements loses
    five digits on the CPU (BLAS accumulates in float32), so there each CHUNK's dot is summed in float64;
    cuBLAS sums a GPU dot as a tree, accurate enough whole."""
    flat = array.reshape(-1)
    if xp is not np:
        return xp.vdot(flat, flat).astype(xp.float64)
    return np.float64(sum(float(np.vdot(flat[start:start + CHUNK], flat[start:start + CHUNK]))
                          for start in range(0, flat.size, CHUNK)))
