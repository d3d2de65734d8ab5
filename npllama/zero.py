"""The optimizer step of a job of several ranks (runtime/distributed.py): the gradients each rank
computed summed across the ranks, clipped, and AdamW applied, with AdamW's state held whole by every
rank (ZeRO stage 0, plain data parallelism) or split across them (ZeRO stage 1, Rajbhandari et al. 2020).

With R ranks, rank r holding g_r (its windows' share of the global mean loss's gradient):
    stage 0   g = Σ_r g_r on every rank (all-reduce); every rank clips g by ‖g‖ and applies AdamW to
              all P parameters; each holds m and v for all P: 2P values of optimizer state.
    stage 1   the flat g is cut in R equal parts; rank r gets part r of Σ_r g_r (reduce-scatter),
              ‖g‖² = Σ_r ‖part r‖² (an all-reduce of one number), clips its part and applies AdamW to
              its part of the parameters only, with m and v for those P/R values; then every rank's
              updated part is sent to all (all-gather). Same arithmetic per element as stage 0; ‖g‖
              sums its squares in another order, so the clipping factor (and the step) may differ from
              stage 0's in its last bit. Without clipping the two are the same, bit for bit.
Both return the same loss and norm on every rank and leave every rank with the same parameters.
The norm is rank 0's, sent to all: ranks on other machines (another BLAS) must not clip differently.
A checkpoint holds AdamW's state whole in either stage: stage 1 gathers its parts to rank 0 to save
them, and sends each rank its part when resuming.
"""
import math

from . import adamw, backend
from .runtime.distributed import Alone, FlatLayout

STAGES = (0, 1)


def make(stage, world, optimizer, params):
    """The step for this stage over these trained parameters (name -> array)."""
    return Sharded(world, optimizer, params) if stage == 1 else Replicated(world, optimizer)


class Replicated:
    """ZeRO stage 0: every rank holds all of AdamW's state (module docstring)."""

    def __init__(self, world=None, optimizer=None):
        self.world, self.optimizer = world or Alone(), optimizer
        self.layout = self.buffer = None

    def step(self, params, loss, grads, lr, grad_clip):
        """Sum loss and grads across the ranks, clip, apply AdamW at lr. Returns (loss, norm before
        clipping); the parameters are not updated when either is not finite."""
        if self.world.size > 1:
            grads = self._summed(grads)
            loss = self.world.total(loss)
        norm = self.world.broadcast(adamw.global_norm(grads))
        if math.isfinite(loss) and math.isfinite(norm):
            adamw.clip_to(grads, grad_clip or None, norm)
            self.optimizer.step(params, grads, lr=lr)
        return loss, norm

    def _summed(self, grads):
        """The grads summed across ranks: laid end to end in one buffer, all-reduced at once."""
        if self.layout is None or self.layout.shapes != {name: grad.shape for name, grad in grads.items()}:
            self.layout = FlatLayout({name: grad.shape for name, grad in grads.items()})
            first = next(iter(grads.values()))
            self.buffer = backend.array_module(first).zeros(self.layout.size, first.dtype)
        self.layout.pack(grads, self.buffer)
        self.world.sum(self.buffer)
        return self.layout.views(self.buffer)

    def state_dict(self):
        return self.optimizer.state_dict()

    def load_state_dict(self, state):
        """state: rank 0's (the checkpoint's); every rank gets it whole."""
        scalars = self.world.broadcast({key: value for key, value in state.items() if key not in ("m", "v")}
                                       if self.world.is_root else None)
        moments = {kind: self.world.broadcast_arrays(state[kind] if self.world.is_root else {}) for kind in ("m", "v")}
        self.optimizer.load_state_dict({**scalars, **moments})


class Sharded:
    """ZeRO stage 1: each rank holds AdamW's state for its part of the flat parameters (module docstring).

    The parameters are laid out as one flat buffer (FlatLayout, padded to R equal parts); this rank's
    part covers pieces of some parameters, each updated as a 1-D piece named as its parameter (decayed
    when the parameter is a matrix)."""

    def __init__(self, world, optimizer, params):
        self.world, self.optimizer = world, optimizer
        self.layout = FlatLayout({name: param.shape for name, param in params.items()}, world.size)
        first = next(iter(params.values()))
        xp = backend.array_module(first)
        self.flat = xp.zeros(self.layout.size, first.dtype)
        self.grads = xp.zeros(self.layout.size, first.dtype)
        self.part = xp.zeros(self.layout.part_size, first.dtype)
        self.low = world.rank * self.layout.part_size
        self.pieces = self.layout.pieces(world.rank)
        self.decayed = {name for name, param in params.items() if param.ndim >= 2}

    def _own(self, buffer, offset=0):
        """name -> this rank's piece of that parameter, a view into buffer (which starts at flat element offset)."""
        return {name: buffer[self.layout.offsets[name] + start - offset:self.layout.offsets[name] + stop - offset]
                for name, start, stop in self.pieces}

    def step(self, params, loss, grads, lr, grad_clip):
        """As Replicated.step, with this rank's part of the state (module docstring)."""
        self.layout.pack(grads, self.grads)
        self.world.reduce_scatter(self.grads, self.part)
        loss = self.world.total(loss)
        own_grads = self._own(self.part, self.low)
        norm = self.world.broadcast(math.sqrt(self.world.total(adamw.sum_of_squares(own_grads))))
        if math.isfinite(loss) and math.isfinite(norm):
            adamw.clip_to(own_grads, grad_clip or None, norm)
            self.layout.pack(params, self.flat)
            self.optimizer.step(self._own(self.flat), own_grads, lr=lr, decayed=self.decayed)
            self.world.all_gather(self.flat)
            for name, view in self.layout.views(self.flat).items():
                params[name][...] = view
        return loss, norm

    def state_dict(self):
        """AdamW's state with m and v whole, on rank 0 (gathered from every rank's part); None elsewhere."""
        state = self.optimizer.state_dict()
        whole = {}
        for kind in ("m", "v"):
            if self.optimizer.steps == 0:  # no moments anywhere yet (every rank agrees: the same steps)
                whole[kind] = {}
                continue
            part = backend.array_module(self.part).zeros_like(self.part)
            for name, piece in self._own(part, self.low).items():
                piece[...] = state[kind][name]
            buffer = backend.to_host(self.flat).copy() if self.world.is_root else None
            self.world.gather_parts(part, buffer)
            whole[kind] = self.layout.unpack(buffer) if self.world.is_root else None
        return {**state, **whole} if self.world.is_root else None

    def load_state_dict(self, state):
        """state: rank 0's whole one (the checkpoint's); each rank keeps the part of m and v it updates."""
        scalars = self.world.broadcast({key: value for key, value in state.items() if key not in ("m", "v")}
                                       if self.world.is_root else None)
        moments = {}
        for kind in ("m", "v"):
            if not self.world.broadcast(bool(state[kind]) if self.world.is_root else None):
                moments[kind] = {}
                continue
            buffer = None
            if self.world.is_root:
                buffer = backend.to_host(self.flat).copy()
                self.layout.pack({name: backend.to_host(moment) for name, moment in state[kind].items()}, buffer)
            part = backend.array_module(self.part).zeros_like(self.part)
            self.world.scatter_parts(buffer, part)
            moments[kind] = {name: piece.copy() for name, piece in self._own(part, self.low).items()}
        self.optimizer.load_state_dict({**scalars, **moments})
