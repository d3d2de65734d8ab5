"""Training runs on a token stream: settings, start and resume, the optimizer step, evaluation,
checkpoints and logs. Callable without the CLI: `start(...)` or `resume(...)`, then `run(...)`.

One step (nanoGPT's recipe, with the Llama model of model.py):
    lr_t = learning_rate(t)                      linear warmup, then cosine decay to min_lr (adamw.py)
    g    = (1/A) Σ_a ∇ loss(batch_a)             A = grad_accum micro-batches of batch_size windows
    g   ← g · min(1, clip / ‖g‖)                 global-norm clipping
    θ   ← AdamW(θ, g, lr_t)
Each micro-batch is cut into `workers` shards of rows, whose gradients are summed across the workers
(runtime/parallel.py: helper processes on the CPU's cores), each shard weighted by its share of the
valid targets. The sum depends on the shard count alone, a recorded setting, not on the machine.
Batches are random windows of the training split, drawn from one seeded generator whose state is
saved with each checkpoint. A resumed run draws the same batches at the same learning rates from the
same parameters and moments, so on the CPU its losses equal the uninterrupted run's bit for bit.

A run directory holds:
    model.safetensors       the npllama weights file (`generate --weights` reads it)
    optimizer.safetensors   AdamW's moments; metadata: step, data-order RNG state, settings, data
    log.csv                 a row per step; evaluation rows add the mean train and validation loss
    curves.png              train and validation loss, when matplotlib is installed
    tokens-*.u16|u32        the tokenized data, reused by the next run (data.py)
Each checkpoint file is written atomically and records its step; resuming refuses two that disagree.
"""
import atexit
import contextlib
import csv
import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
import warnings

import numpy as np

from . import adamw, adapters, backend, data, dtypes, generation, model, zero
from .config import LlamaConfig, block_param_name, human_bytes, parameter_shapes
from .errors import Notice, UserError, setting
from .io import files, run_files, safetensors_file, tokenizer as tokenizers, weights
from .io.run_files import (ADAPTERS_FILE, LOG_FIELDS, LOG_FILE, MODEL_FILE, OPTIMIZER_FILE,  # the run's files
                           STEP_KEY, TRAIN_KEY)
from .ops.lm_head import IGNORE_INDEX
from .runtime import cpu, distributed, parallel, quantized

CURVES_FILE = "curves.png"
NEXT = ".next"  # a checkpoint's files are written under NAME.next first (see TrainingRun.save)
LOCK_FILE = "run.lock"  # the process id of the one process training in a run directory
DEFAULT_SHAPE = "shakespeare-char"  # nanoGPT's CPU recipe as a Llama; the vocabulary comes from the data
RESUME_ADJUSTABLE = ("max_iters", "eval_interval", "eval_iters", "sample_tokens", "recompute")  # same updates


class TrainError(UserError):
    """Training cannot start or go on (message is one line, fit for the user)."""


@dataclasses.dataclass
class TrainSettings:
    """Everything a run is trained with, besides the model and the data: the only home of the defaults."""
    batch_size: int = 12
    grad_accum: int = 1
    max_iters: int = 2000
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup: int = 100
    decay_iters: int = None  # where the cosine reaches min_lr; None: max_iters
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    eval_interval: int = 250
    eval_iters: int = 200
    val_fraction: float = 0.1
    seed: int = 1337
    sample_tokens: int = 200
    dtype: str = "fp32"
    context: int = None  # tokens per training window; None: the model's max_position_embeddings
    init: str = None  # the weights training started from (a LoRA run needs them to resume)
    lora_rank: int = 0  # > 0: train LoRA adapters of this rank on frozen weights
    lora_alpha: float = None  # adapters scale by alpha / rank; None: alpha = rank
    lora_targets: tuple = ("q_proj", "v_proj")
    workers: int = None  # shards per batch, summed across workers; None: parallel.default_count()
    world_size: int = None  # ranks of the MPI job, each drawing batch_size windows; None: this job's
    zero: int = 0  # ZeRO stage: 0, every rank holds AdamW's state; 1, each rank 1/world_size of it (zero.py)
    recompute: bool = False  # keep only each block's input, recompute the rest in the backward pass

    def __post_init__(self):
        if self.decay_iters is None:
            self.decay_iters = self.max_iters
        if self.lora_alpha and not self.lora_rank:
            raise TrainError(f"{setting('lora_alpha')} scales LoRA adapters: give {setting('lora_rank')} too")
        if self.lora_alpha is None:
            self.lora_alpha = float(self.lora_rank)
        if self.workers is None:
            self.workers = parallel.default_count()
        if self.world_size is None:
            self.world_size = distributed.world().size
        self.lora_targets = tuple(self.lora_targets)
        self.validate()

    @property
    def lora_scale(self):
        """alpha / rank, or None when no adapters are trained."""
        return self.lora_alpha / self.lora_rank if self.lora_rank else None

    def validate(self):
        for name in ("batch_size", "grad_accum", "max_iters", "eval_interval", "eval_iters", "workers", "world_size"):
            if getattr(self, name) < 1:
                raise TrainError(f"{setting(name)} must be at least 1, got {getattr(self, name)}")
        if self.context is not None and self.context < 1:
            raise TrainError(f"{setting('context')} must be at least 1, got {self.context}")
        for name in ("lr", "min_lr", "weight_decay", "grad_clip"):
            if not math.isfinite(getattr(self, name)):
                raise TrainError(f"{setting(name)} must be a finite number, got {getattr(self, name)}")
        for name in ("warmup", "sample_tokens", "weight_decay", "grad_clip", "min_lr", "seed"):
            if getattr(self, name) < 0:
                raise TrainError(f"{setting(name)} must not be negative, got {getattr(self, name)}")
        if not self.lr > 0:
            raise TrainError(f"{setting('lr')} must be positive, got {self.lr}")
        if self.min_lr > self.lr:
            raise TrainError(f"{setting('min_lr')} {self.min_lr} is above {setting('lr')} {self.lr}: the learning "
                             "rate decays from lr down to min_lr")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise TrainError(f"{setting(name)} must lie in [0, 1), got {getattr(self, name)}")
        if not 0 <= self.val_fraction < 1:
            raise TrainError(f"{setting('val_fraction')} must lie in [0, 1), got {self.val_fraction}")
        if self.dtype not in ("fp32", "fp64"):
            raise TrainError(f"{setting('dtype')} must be fp32 or fp64 (the parameters' and moments' dtype), "
                             f"got {self.dtype!r}")
        if self.lora_rank < 0:
            raise TrainError(f"{setting('lora_rank')} must not be negative, got {self.lora_rank}")
        if self.lora_rank and not self.lora_alpha > 0:
            raise TrainError(f"{setting('lora_alpha')} must be positive, got {self.lora_alpha}")
        if self.lora_rank and not self.init:
            raise TrainError(f"{setting('lora_rank')} trains adapters on a pretrained model: give its weights "
                             f"with {setting('init')}")
        adapters.check_targets(self.lora_targets)
        if self.zero not in zero.STAGES:
            raise TrainError(f"{setting('zero')} must be one of {', '.join(map(str, zero.STAGES))}, got {self.zero}")
        if self.zero and self.world_size < 2:
            raise TrainError(f"{setting('zero')} {self.zero} splits AdamW's state across the ranks of an MPI job: "
                             f"start the run with `mpiexec -n N` (N ≥ 2), or drop {setting('zero')}")


def memory_needed(config, settings, weight_bytes=None):
    """Bytes one rank holds at its peak, by part: an estimate from the shapes alone, so that a run too
    large for the machine is refused before it allocates anything. With s bytes per value, P the
    model's parameters, Pₜ the trained ones (P, or a LoRA run's adapters), W the workers, R the ranks:
        weights       P·s (or weight_bytes: a LoRA run's base in quantized blocks), twice when W > 1
                      (the shard pool's shared copy)
        gradients     Pₜ·s·(W + 1 if accumulating else W): every worker sums its shard's gradients in its
                      own buffer, and accumulating micro-batches keeps their sum besides
        moments       2·Pₜ·s      AdamW's m and v (÷R in ZeRO stage 1)
        sums          with R > 1, the flat buffers the ranks sum through (zero.py): Pₜ·s in stage 0;
                      (2 + 1/R)·Pₜ·s in stage 1 (parameters, gradients, this rank's part)
        activations   B·T·(L·a + 2V + D)·s + W·L·D·(D + 2Dₖᵥ)·s,  a = 6D + 3Dₖᵥ + 4F + H·T + 2
                      (with recompute: B·T·(L·D + a + 2V + D)·s + W·D·(D + 2Dₖᵥ)·s)
    The activations are what one micro-batch of B windows of T tokens keeps for the backward pass: per
    layer and token (a) the block's input and its mid-block sum, the normed inputs of attention and MLP
    (and their RMS), q (and k, rotated), copies of k and v, the heads' attention probabilities, the
    attention output, the MLP's four F-wide intermediates (gate, up, SiLU(gate), their product), or
    with recompute only each block's input plus one block's a at a time; then the head's input,
    logits and probabilities; and each worker's fused copy of the q/k/v weights."""
    s = 8 if settings.dtype == "fp64" else 4
    d, f, layers, heads = (config.hidden_size, config.intermediate_size, config.num_hidden_layers,
                           config.num_attention_heads)
    kv = config.num_key_value_heads * config.head_dim
    batch, time = settings.batch_size, settings.context or config.max_position_embeddings
    workers, ranks = min(settings.workers, batch), settings.world_size
    total = config.num_parameters()
    trained = _adapter_parameters(config, settings) if settings.lora_rank else total
    per_layer = 6 * d + 3 * kv + 4 * f + heads * time + 2
    per_token = (layers * d + per_layer if settings.recompute else layers * per_layer) + 2 * config.vocab_size + d
    fused_copies = 1 if settings.recompute else layers  # a block's q/k/v weight lives as long as its cache
    accumulating = settings.grad_accum > 1
    weights = total * s if weight_bytes is None else weight_bytes
    parts = {"weights": weights * (2 if workers > 1 else 1), "gradients": trained * s * (workers + accumulating),
             "AdamW moments": 2 * trained * s // (ranks if settings.zero else 1),
             "activations": (batch * time * per_token + workers * fused_copies * d * (d + 2 * kv)) * s}
    if ranks > 1:
        parts["sums"] = trained * s * (2 + 1 / ranks if settings.zero else 1)
    return parts


def _training_bytes(params, name, settings):
    """A weight's bytes once model.trainable has it: blocks as stored, floats in the master dtype."""
    stored, shape = safetensors_file.dtype_and_shape(params, name)
    if dtypes.is_quantized(stored):
        return int(np.prod(quantized.stored_shape(stored, shape)))
    return int(np.prod(shape)) * (8 if settings.dtype == "fp64" else 4)


def _adapter_parameters(config, settings):
    shapes = parameter_shapes(config)
    return sum(settings.lora_rank * sum(shapes[block_param_name(layer, target)])
               for layer in range(config.num_hidden_layers) for target in settings.lora_targets)


def check_memory(config, settings, held=0, params=None):
    """Refuse a run that needs more memory than the device has free (memory_needed, for every rank of
    the job on this machine), with the figures; `held`: bytes of it already allocated (a resumed run's
    checkpoint); params: the weights a run starts from (their quantized blocks stay as they are)."""
    weight_bytes = None if params is None else sum(_training_bytes(params, name, settings) for name in params)
    parts, available = memory_needed(config, settings, weight_bytes), backend.free_memory()
    here = distributed.world().local_size if backend.device() == "cpu" else 1  # a GPU each: its own memory
    if here * sum(parts.values()) > available + held:
        detail = ", ".join(f"{name} {human_bytes(size)}" for name, size in parts.items())
        ranks = f" a rank, for {here} ranks here" if here > 1 else ""
        raise TrainError(f"this run needs about {human_bytes(sum(parts.values()))}{ranks} ({detail}) but "
                         f"{human_bytes(available)} are free on the {backend.device().upper()}; use a smaller "
                         f"{setting('batch_size')} (with {setting('grad_accum')} for as many tokens per step), "
                         f"{setting('context')} or model, {setting('recompute')}, or fewer {setting('workers')}")


@dataclasses.dataclass
class StepReport:
    step: int
    lr: float
    loss: float
    grad_norm: float
    tokens_per_second: float
    elapsed_seconds: float


# ---- the step's gradient, summed across workers and ranks ----------------------------------------------
def shard_loss_and_grads(arrays, config, lora_scale, tokens, targets, scale, recompute=False):
    """One shard's loss, and the gradient of scale × that loss (the task each worker runs). lora_scale:
    None, or the adapters' alpha / rank (the arrays hold a frozen base and adapters)."""
    return model.loss_and_grads(adapters.with_adapters(quantized.from_arrays(arrays), lora_scale), config, tokens,
                                targets, scale, recompute=recompute)


def sharded_loss_and_grads(arrays, config, tokens, targets, shards=1, workers=None, lora_scale=None,
                           recompute=False, world=None):
    """This rank's part of the mean loss over every rank's batch, and its gradient for the trained
    arrays, the batch cut into `shards` shards of rows summed across `workers` (parallel.py; default:
    the seam for that many shards). A shard weighs by its share of the valid targets of all the ranks'
    batches (world: the job, default this process alone); one without any adds nothing and is left out."""
    tokens = model.check_tokens(tokens, config)
    targets = model.check_targets(targets, tokens, config)
    valid = targets != IGNORE_INDEX
    total_valid = (world or distributed.Alone()).total(int(valid.sum()))
    groups = [rows for rows in np.array_split(np.arange(len(tokens)), min(shards, len(tokens))) if valid[rows].any()]
    shares = [float(valid[rows].sum() / total_valid) for rows in groups]
    tasks = [(config, lora_scale, tokens[rows], targets[rows], share, recompute) for rows, share in zip(groups, shares)]
    trained = arrays if lora_scale is None else adapters.split(arrays)[1]
    losses, grads = (workers or parallel.workers(len(tasks))).run(shard_loss_and_grads, arrays, tasks, list(trained))
    return sum(share * loss for share, loss in zip(shares, losses, strict=True)), grads


def accumulated_loss_and_grads(arrays, config, micro_batches, shards=1, workers=None, lora_scale=None,
                               recompute=False, world=None):
    """The mean loss and gradient over equally sized micro-batches [(tokens, targets), ...]:
    g = (1/A) Σ_a ∇ loss_a, which equals the gradient of the whole batch when every target counts
    (with several ranks: this rank's part of them, sharded_loss_and_grads)."""
    total_loss, total = 0.0, None
    for tokens, targets in micro_batches:
        micro_loss, grads = sharded_loss_and_grads(arrays, config, tokens, targets, shards, workers, lora_scale,
                                                   recompute, world)
        total_loss += micro_loss / len(micro_batches)
        for grad in grads.values():  # in place: the step holds one gradient, and the sum, never more
            grad /= len(micro_batches)
        if total is None:
            total = grads
        else:
            for name, grad in grads.items():
                total[name] += grad
        del grads  # freed before the next micro-batch's are made
    return total_loss, total


def optimizer_step(arrays, config, optimizer, micro_batches, lr, grad_clip, shards=1, workers=None, lora_scale=None,
                   recompute=False, update=None):
    """One step: the gradient (accumulated over the micro-batches, summed across workers and ranks),
    clipped to grad_clip (0: not clipped), then AdamW at lr. update: how the ranks sum and apply it
    (zero.py; default: this process alone, with `optimizer`). Returns (loss, gradient norm before
    clipping); the arrays are not updated when either is not finite."""
    update = update or zero.Replicated(distributed.Alone(), optimizer)
    loss, grads = accumulated_loss_and_grads(arrays, config, micro_batches, shards, workers, lora_scale, recompute,
                                             update.world)
    return update.step({name: arrays[name] for name in grads}, loss, grads, lr, grad_clip)


# ---- a run ------------------------------------------------------------------------------------------
class TrainingRun:
    """One run: model, tokenizer, optimizer, data order and step, saved and restored as a whole.

    params are what the optimizer trains: the model's parameters, or in a LoRA run the adapters, which
    are attached to the frozen base_params (adapters.py) to make the model's weights. optimizer: the
    AdamW state a resumed run goes on from (on ranks other than 0 of a job, any: rank 0's is sent);
    rng_state: this rank's data stream's. world: the job this run is a rank of (runtime/distributed.py):
    rank 0 alone writes the run's files; each rank draws its own batches."""

    def __init__(self, directory, config, params, tokenizer, settings, ids, data_info,
                 optimizer=None, step=0, rng_state=None, elapsed=0.0, base_params=None, world=None):
        self.world = world or distributed.Alone()
        if settings.world_size != self.world.size:
            raise TrainError(f"this run's settings are for {settings.world_size} rank(s), but {self.world.size} "
                             "are running it")
        self.directory, self.config, self.params, self.tokenizer = directory, config, params, tokenizer
        # what the workers share: arrays only, a quantized base as its blocks (runtime/quantized.as_arrays)
        self.arrays = quantized.as_arrays({**base_params, **params}) if settings.lora_rank else params
        self.model_params = adapters.with_adapters(quantized.from_arrays(self.arrays), settings.lora_scale)
        self.settings, self.data_info = settings, data_info
        if self.world.is_root:
            os.makedirs(directory, exist_ok=True)
        _check_windows(settings, config, ids, self.world.size)
        self.train_ids, self.val_ids = data.split(ids, settings.val_fraction)
        self.optimizer = adamw.AdamW(settings.lr, (settings.beta1, settings.beta2), weight_decay=settings.weight_decay)
        self.update = zero.make(settings.zero, self.world, self.optimizer, {name: self.arrays[name] for name in params})
        if optimizer is not None:
            self.update.load_state_dict(optimizer.state_dict())
        self.workers = parallel.workers(min(settings.workers, settings.batch_size))
        self.step = step
        self.rng = _data_stream(settings.seed, self.world.rank, rng_state, step if optimizer is not None else None)
        self.started = time.perf_counter() - elapsed  # elapsed_seconds continue across a resume
        self.saved_step = step if optimizer is not None else None  # a resumed run starts from a checkpoint
        cpu.keep_freed_memory()

    @property
    def context(self):
        return self.settings.context or self.config.max_position_embeddings

    @property
    def global_batch(self):
        """Windows per optimizer step, over every rank: ranks × batch_size × grad_accum."""
        return self.world.size * self.settings.batch_size * self.settings.grad_accum

    # ---- one optimizer step -----------------------------------------------------------------------
    def train_step(self):
        """Draw grad_accum batches and take one optimizer step (optimizer_step). Returns a StepReport;
        the step does not advance when the loss or the gradient is not finite."""
        s = self.settings
        started = time.perf_counter()
        lr = adamw.learning_rate(self.step, s.lr, s.min_lr, s.warmup, s.decay_iters)
        batches = [data.random_batch(self.train_ids, s.batch_size, self.context, self.rng)
                   for _ in range(s.grad_accum)]
        step_loss, norm = optimizer_step(self.arrays, self.config, self.optimizer, batches, lr, s.grad_clip,
                                         s.workers, self.workers, s.lora_scale, s.recompute, self.update)
        if math.isfinite(step_loss) and math.isfinite(norm):
            self.step += 1
        seconds = time.perf_counter() - started
        tokens = self.global_batch * self.context
        return StepReport(self.step, lr, step_loss, norm, tokens / seconds, time.perf_counter() - self.started)

    # ---- evaluation -------------------------------------------------------------------------------
    def evaluate(self):
        """Mean loss over eval_iters random batches of each split, from a generator seeded by the
        step (so evaluating never changes the training batches). {'train': loss, 'val': loss or None}.
        The ranks of a job share the batches out (rank r: batches r, r + ranks, ...) and gather the
        losses, so the mean is the same as one process's."""
        rng = np.random.default_rng([self.settings.seed, self.step])
        rank, ranks = self.world.rank, self.world.size
        means = {}
        for split, ids in (("train", self.train_ids), ("val", self.val_ids)):
            if len(ids) == 0:
                means[split] = None
                continue
            batches = [data.random_batch(ids, self.settings.batch_size, self.context, rng)
                       for _ in range(self.settings.eval_iters)]
            own = [model.loss(self.model_params, self.config, *batch) for batch in batches[rank::ranks]]
            by_rank = self.world.all_gather_objects(own)
            means[split] = float(np.mean([by_rank[i % ranks][i // ranks] for i in range(len(batches))]))
        return means

    def sample(self):
        """A short seeded continuation (nanoGPT's: temperature 0.8, top-k 200, no top-p or min-p) from
        BOS, or else from the first token of the training data."""
        if self.settings.sample_tokens == 0 or not self.world.is_root:
            return ""
        start = [self.tokenizer.bos_id if self.tokenizer.add_bos else int(self.train_ids[0])]
        length = min(self.settings.sample_tokens, self.context - 1)
        new = generation.generate(self.model_params, self.config, start, length, temperature=0.8, top_k=200,
                                  top_p=1.0, min_p=0.0, seed=self.settings.seed + self.step,
                                  eos_ids=self.tokenizer.eos_ids,
                                  vocab_limit=self.tokenizer.vocab_size)
        return self.tokenizer.decode(start + new)

    # ---- checkpoints --------------------------------------------------------------------------------
    @property
    def checkpoint_file(self):
        return os.path.join(self.directory, ADAPTERS_FILE if self.settings.lora_rank else MODEL_FILE)

    def save(self):
        """Write a checkpoint as one unit: the optimizer state (with the step) to optimizer.safetensors.next,
        the model (or the adapters, with the step) to its NAME.next, then rename the first over
        optimizer.safetensors and the second over its name. A kill at any moment leaves a run that
        finish_checkpoint makes whole: the model's .next exists only once both are complete, so it is
        rolled forward; without it the optimizer's .next is an unfinished checkpoint and is dropped.
        A full disk keeps the previous checkpoint and says so. Every rank of a job takes part (their data
        streams, and in ZeRO stage 1 their parts of AdamW's state, are gathered); rank 0 writes."""
        rng_states = self.world.gather(self.rng.bit_generator.state)
        optimizer_state = self.update.state_dict()
        _on_root(self.world, lambda: self._write_checkpoint(optimizer_state, rng_states))
        self.saved_step = self.step

    def _write_checkpoint(self, optimizer_state, rng_states):
        try:
            self._write_next(optimizer_state, rng_states)
        except files.DiskFullError as error:
            finish_checkpoint(self.directory)  # drops what was written of this one
            kept = (f"the checkpoint of step {self.saved_step} is kept" if self.saved_step is not None
                    else "no checkpoint had been written yet")
            raise TrainError(f"{error.reason} saving the checkpoint of step {self.step} in {self.directory}; "
                             f"{kept}") from None
        finish_checkpoint(self.directory)

    def _write_next(self, state, rng_states):
        tensors = {f"{kind}/{name}": backend.to_host(state[kind][name]) for kind in ("m", "v") for name in state[kind]}
        train_state = {"step": self.step, "rng_state": rng_states[0], "rng_states": rng_states,
                       "elapsed_seconds": time.perf_counter() - self.started,
                       "settings": dataclasses.asdict(self.settings), "data": self.data_info,
                       "base": _identity(self.settings.init) if self.settings.lora_rank else None,
                       "optimizer": {key: state[key] for key in state if key not in ("m", "v")}}
        safetensors_file.write(os.path.join(self.directory, OPTIMIZER_FILE + NEXT), tensors,
                               {TRAIN_KEY: json.dumps(train_state)})
        if self.settings.lora_rank:
            weights.save_adapters(self.checkpoint_file + NEXT, self.params, self.settings.lora_rank,
                                  self.settings.lora_alpha, self.settings.lora_targets,
                                  metadata={STEP_KEY: str(self.step)}, base_params=quantized.from_arrays(self.arrays),
                                  base_name=self.settings.init)
        else:
            weights.save(self.checkpoint_file + NEXT, self.config, self.params, self.tokenizer,
                         metadata={STEP_KEY: str(self.step)})


def _check_windows(settings, config, ids, ranks):
    """Refuse windows the model or the data cannot give: longer than the model's context, longer than
    either split, or more of them a micro-batch across the ranks than the training split holds."""
    context = settings.context or config.max_position_embeddings
    if context > config.max_position_embeddings:
        raise TrainError(f"{setting('context')} {settings.context} is longer than the model's context "
                         f"({config.max_position_embeddings})")
    train_ids, val_ids = data.split(ids, settings.val_fraction)
    data.check_long_enough(train_ids, val_ids, context)
    tokens = ranks * settings.batch_size * context
    if ranks > 1 and tokens > len(train_ids):
        raise TrainError(f"{ranks} ranks × {setting('batch_size')} {settings.batch_size} windows × {context} tokens "
                         f"({tokens:,} tokens a micro-batch) is more than the training split holds "
                         f"({len(train_ids):,} tokens): use fewer ranks or a smaller {setting('batch_size')}")


def _data_stream(seed, rank, state=None, resumed_at=None):
    """The generator rank `rank` draws its batches from: seeded by seed (rank 0, as one process) or
    [seed, rank], and set to `state` when given. A rank that resumes a run without a saved stream
    (the job grew) starts one of its own, seeded by [seed, rank, the step]."""
    if state is None and resumed_at is not None and rank > 0:
        return np.random.default_rng([seed, rank, resumed_at])
    rng = np.random.default_rng(seed if rank == 0 else [seed, rank])
    if state is not None:
        rng.bit_generator.state = state
    return rng


def _on_root(world, action):
    """Run action() on rank 0 alone (files, printing) while the other ranks wait: should it fail, they
    stop too (distributed.Stopped), rather than wait for rank 0 at the next step's sum for ever."""
    failure = None
    if world.is_root:
        try:
            action()
        except BaseException as error:  # re-raised below, once the others know
            failure = error
    if world.broadcast(failure is not None):
        raise failure if world.is_root else distributed.Stopped()


def finish_checkpoint(directory):
    """Make the run's checkpoint whole after a save that may have been cut short (TrainingRun.save)."""
    optimizer_next = os.path.join(directory, OPTIMIZER_FILE + NEXT)
    model_next = [path for path in (os.path.join(directory, name + NEXT) for name in (MODEL_FILE, ADAPTERS_FILE))
                  if os.path.exists(path)]
    if model_next:  # both were written: the new checkpoint is complete
        if os.path.exists(optimizer_next):
            os.replace(optimizer_next, optimizer_next[:-len(NEXT)])
        os.replace(model_next[0], model_next[0][:-len(NEXT)])
    elif os.path.exists(optimizer_next):  # the model was not written: the previous checkpoint stands
        os.remove(optimizer_next)


def _identity(path):
    """What tells a file apart from a replacement without reading it: size and modification time (a
    directory, such as an HF checkpoint, by its files')."""
    paths = sorted(os.path.join(path, name) for name in os.listdir(path)) if os.path.isdir(path) else [path]
    return [[os.path.basename(p), os.stat(p).st_size, os.stat(p).st_mtime_ns] for p in paths]


@dataclasses.dataclass
class Checkpoint:
    config: object
    params: dict          # what the optimizer trains (the model, or a LoRA run's adapters)
    tokenizer: object
    optimizer: object
    state: dict           # step, rng_state, settings, data, elapsed_seconds
    base_params: dict = None  # a LoRA run's frozen model


def load_checkpoint(directory):
    """The last checkpoint of a run directory (finished first, should its writing have been cut short)."""
    if os.path.isdir(directory):
        finish_checkpoint(directory)
    optimizer_path = os.path.join(directory, OPTIMIZER_FILE)
    if not os.path.isfile(optimizer_path):
        raise TrainError(f"{setting('resume')}: {directory} has no checkpoint ({OPTIMIZER_FILE} is missing)")
    metadata, tensors = safetensors_file.read(optimizer_path)
    try:
        state = json.loads(metadata[TRAIN_KEY])
        settings = TrainSettings(**state["settings"])
        complete = {"step", "rng_state", "data", "optimizer"} <= state.keys()
    except (KeyError, TypeError, AttributeError, json.JSONDecodeError):
        complete = False
    if not complete:
        raise TrainError(f"{optimizer_path} is not an npllama training checkpoint")
    checkpoint_path = os.path.join(directory, ADAPTERS_FILE if settings.lora_rank else MODEL_FILE)
    if not os.path.isfile(checkpoint_path):
        raise TrainError(f"{setting('resume')}: {directory} has no checkpoint "
                         f"({os.path.basename(checkpoint_path)} is missing)")
    checkpoint_step = safetensors_file.read(checkpoint_path)[0].get(STEP_KEY)
    if checkpoint_step is None:
        raise TrainError(f"{checkpoint_path} is not a training checkpoint (it records no training step)")
    if int(checkpoint_step) != state["step"]:
        raise TrainError(f"{directory}: the model is at step {checkpoint_step} but the optimizer at step "
                         f"{state['step']} (a checkpoint was interrupted); cannot resume exactly")
    base_params = None
    if settings.lora_rank:
        if not os.path.exists(settings.init) or _identity(settings.init) != state.get("base"):
            raise TrainError(f"{settings.init}, the model these adapters were trained on, is missing or changed "
                             "since the run started; cannot resume exactly")
        config, base, tokenizer = weights.load(settings.init)
        base_params = model.trainable(base, settings.dtype)
        params = model.trainable(weights.load_adapters(checkpoint_path, config)[0], settings.dtype)
    else:
        config, params, tokenizer = weights.load(checkpoint_path)
        params = model.trainable(params, settings.dtype)
    optimizer = adamw.AdamW(settings.lr, (settings.beta1, settings.beta2), weight_decay=settings.weight_decay)
    optimizer.load_state_dict({**state["optimizer"],
                               **{kind: {name: np.array(tensors[f"{kind}/{name}"])  # to the device at the first step
                                         for name in params if f"{kind}/{name}" in tensors} for kind in ("m", "v")}})
    return Checkpoint(config, params, tokenizer, optimizer, state, base_params)


# ---- start and resume -----------------------------------------------------------------------------------
def start(directory, data_path=None, tokenizer=None, preset=None, model_settings=None, settings=None, force=False):
    """A new run in `directory` (made for it, and removed again when the run cannot start).

    data_path: a UTF-8 text file (default: the built-in corpus). A new model takes the shape of `preset`
    (default DEFAULT_SHAPE's) changed by model_settings (LlamaConfig fields, e.g. {"hidden_size": 64}),
    with the vocabulary of `tokenizer` ('char', the default; 'bpe:N'; or a SentencePiece .model path).
    settings: TrainSettings (default: the defaults); its `init` names weights to start from instead
    (continued pre-training, fine-tuning, LoRA), whose shape and tokenizer are the model's own. force:
    start over in a directory that holds a run. In a job of several ranks every rank calls it with the
    same arguments (the job stops if they differ); rank 0 starts the run and sends the others the model
    and the data."""
    settings = settings or TrainSettings()
    model_settings = {name: value for name, value in (model_settings or {}).items() if value is not None}
    world = distributed.world()
    distributed.use_local_gpu(world)
    compared = {**dataclasses.asdict(settings), "workers": None}  # a machine's default; every rank takes rank 0's
    init = os.path.abspath(settings.init) if settings.init else None  # (compared as given: another machine's cwd)
    settings = dataclasses.replace(settings, init=init)
    world.check_same("settings", {"directory": directory, "data": data_path, "tokenizer": tokenizer,
                                  "preset": preset, **model_settings, **compared, "force": force})
    undo, moved = [], []

    def make_parts():
        if os.path.exists(directory) and not os.path.isdir(directory):
            raise TrainError(f"{setting('out')} {directory} is a file; it names the run directory")
        if init and (preset or model_settings):
            raise TrainError(f"{setting('init')} takes the model's own shape: drop {setting('preset')} and the "
                             f"model's settings ({setting('context')} may shorten the training windows)")
        if init and tokenizer:
            raise TrainError(f"{setting('init')} trains with the model's own tokenizer: drop {setting('tokenizer')}")
        if os.path.exists(os.path.join(directory, OPTIMIZER_FILE)) and not force:
            raise TrainError(f"{directory} already holds a training run; pass {setting('resume')} to continue it, "
                             f"or {setting('force')} to start over")
        made = not os.path.exists(directory)
        os.makedirs(directory, exist_ok=True)
        claim(directory)
        files.remove_leftovers(directory)  # of a run killed while writing
        finish_checkpoint(directory)  # an old run's unfinished save must not complete the new run's first one
        moved.append(_move_aside(directory))
        undo.append(lambda: _undo_start(directory, made, moved[0]))
        return _start(directory, data_path or data.BUILTIN_CORPUS, tokenizer, preset, model_settings, settings)

    run = _shared_run(world, make_parts, on_failure=lambda: [step() for step in undo])
    if moved and moved[0]:
        warnings.warn(f"{directory} held a run: its files are now in {moved[0]}", RunWarning)
    return run


def _undo_start(directory, made, moved):
    """A new run that did not start: its directory removed, or the old run's files put back as they were."""
    if made:
        shutil.rmtree(directory, ignore_errors=True)
    elif moved:
        for name in os.listdir(moved):
            os.replace(os.path.join(moved, name), os.path.join(directory, name))
        os.rmdir(moved)


RUN_FILES = (MODEL_FILE, OPTIMIZER_FILE, ADAPTERS_FILE, LOG_FILE, CURVES_FILE)


def _move_aside(directory):
    """A run started over (force) in a directory that holds one: the old run's files go to
    DIR/previous-N (start says so once the new run has started), so that nothing of it is lost should
    the new run fail."""
    present = [name for name in RUN_FILES if os.path.exists(os.path.join(directory, name))]
    if not present:
        return None
    number = 1
    while os.path.exists(os.path.join(directory, f"previous-{number}")):
        number += 1
    aside = os.path.join(directory, f"previous-{number}")
    os.mkdir(aside)
    for name in present:
        os.replace(os.path.join(directory, name), os.path.join(aside, name))
    return aside


class RunWarning(Notice):
    """Something a run did that the user should know of (one line)."""


def _start(directory, data_path, tokenizer_spec, preset, model_settings, settings):
    """A new run's TrainingRun arguments (rank 0's work)."""
    text = data.read_text(data_path)
    init = settings.init
    if init:
        config, params, tokenizer = weights.load(init)
        if tokenizer is None:
            raise TrainError(f"{init} has no tokenizer to read the data with")
        check_memory(config, settings, params=params)
    else:
        tokenizer = data.make_tokenizer(tokenizer_spec or "char", text, directory)
        fields = {**LlamaConfig.preset(preset or DEFAULT_SHAPE).to_dict(), **model_settings}
        if "num_attention_heads" in model_settings and "num_key_value_heads" not in model_settings:
            fields["num_key_value_heads"] = model_settings["num_attention_heads"]
        config = LlamaConfig.from_dict({**fields, "vocab_size": tokenizer.vocab_size})
        check_memory(config, settings)
        params = model.init_params(config, seed=settings.seed)
    ids, info = _read_data(text, data_path, tokenizer, directory,
                           f"the tokenizer of {init}" if init else "the tokenizer")
    params = model.trainable(params, settings.dtype)
    blocks = [value for value in params.values() if not backend.is_array(value)]
    if blocks and not settings.lora_rank:
        raise TrainError(f"{init} holds quantized weights ({blocks[0].kind}): training every weight needs float ones; "
                         f"train LoRA adapters on them ({setting('lora_rank')}), or convert them first "
                         "(load-weights --dtype fp32)")
    parts = dict(directory=directory, config=config, params=params, tokenizer=tokenizer, settings=settings, ids=ids,
                 data_info=info)
    if not settings.lora_rank:
        return parts
    lora = adapters.init_adapters(params, config, settings.lora_targets, settings.lora_rank, settings.lora_alpha,
                                  settings.seed)
    return {**parts, "params": lora, "base_params": params}


def _shared_run(world, make_parts, on_failure=lambda: None):
    """This rank's TrainingRun. Rank 0 alone reads and writes the run's files: there make_parts() gives
    TrainingRun's arguments (rng_states: every rank's data stream, or None), and the other ranks are
    sent them. Should rank 0 fail, on_failure() undoes its work there and the others stop (Stopped)."""
    parts = None
    if world.is_root:
        try:
            parts = make_parts()
            _check_windows(parts["settings"], parts["config"], parts["ids"], world.size)  # here, not on every rank
        except BaseException:
            world.broadcast(None)
            on_failure()
            raise
    parts = _sent_to_every_rank(world, parts)
    states = parts.pop("rng_states", None)
    try:
        return TrainingRun(**parts, rng_state=states[world.rank] if states and world.rank < len(states) else None,
                           world=world)
    except BaseException:
        if world.is_root:
            on_failure()
        raise


def _sent_to_every_rank(world, parts):
    """Rank 0's TrainingRun arguments (None: it failed), on every rank: the small ones pickled, the
    arrays (the trained parameters, a LoRA run's base, the token ids) as buffers."""
    if world.size == 1:
        return parts
    root = world.is_root
    header = world.broadcast(None if parts is None else {
        "directory": parts["directory"], "config": parts["config"].to_dict(),
        "tokenizer": tokenizers.to_metadata(parts["tokenizer"]), "settings": dataclasses.asdict(parts["settings"]),
        "data_info": parts["data_info"], "step": parts.get("step", 0), "rng_states": parts.get("rng_states"),
        "elapsed": parts.get("elapsed", 0.0), "resumed": parts.get("optimizer") is not None,
        "lora": parts.get("base_params") is not None})
    if header is None:
        raise distributed.Stopped()
    params = world.broadcast_arrays({name: backend.to_host(array) for name, array in parts["params"].items()}
                                    if root else {})
    base = world.broadcast_arrays({name: backend.to_host(array) for name, array in
                                   quantized.as_arrays(parts["base_params"]).items()}
                                  if root and header["lora"] else {})
    ids = world.broadcast_arrays({"ids": np.asarray(parts["ids"])} if root else {})["ids"]
    if root:
        return parts
    settings = TrainSettings(**header["settings"])
    return dict(directory=header["directory"], config=LlamaConfig.from_dict(header["config"]),
                params=model.trainable(params, settings.dtype), tokenizer=tokenizers.from_metadata(header["tokenizer"]),
                settings=settings, ids=ids, data_info=header["data_info"], step=header["step"],
                rng_states=header["rng_states"], elapsed=header["elapsed"],
                optimizer=adamw.AdamW() if header["resumed"] else None,  # its state comes from rank 0
                base_params=model.trainable(quantized.from_arrays(base), settings.dtype) if header["lora"] else None)


def _read_data(text, data_path, tokenizer, directory, tokenizer_name="the tokenizer"):
    """The text's token ids (cached in the run directory) and what identifies the text."""
    data.check_coverage(tokenizer, text, tokenizer_name, data_path)
    info = {"path": os.path.abspath(data_path), "sha256": hashlib.sha256(text.encode()).hexdigest()}
    return data.token_ids(text, tokenizer, directory), info


def resume(directory, data_path=None, force=False, **changes):
    """The run in `directory`, from its last checkpoint, to go on exactly as it would have. Only the
    settings in RESUME_ADJUSTABLE may change (e.g. max_iters=5000: train longer; the cosine still ends at
    the saved decay_iters). data_path: the text, when it has moved (its contents must be the same).
    A job of another number of ranks than the run's is refused (each rank draws its own batches), or
    with force goes on, its batches no longer those of the uninterrupted run. Every rank of a job
    calls it with the same arguments; rank 0 reads the checkpoint and sends the others what they need."""
    world = distributed.world()
    distributed.use_local_gpu(world)
    world.check_same("settings", {"directory": directory, "data": data_path, "force": force,
                                  **changes})
    return _shared_run(world, lambda: _resume(directory, data_path, force, changes, world.size))


def _resume(directory, data_path, force, changes, world_size):
    """A resumed run's TrainingRun arguments (rank 0's work)."""
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise TrainError(f"{setting('out')} {directory} is a file; it names the run directory")
    fixed = [name for name in changes if name not in RESUME_ADJUSTABLE]
    if fixed:
        raise TrainError(f"{setting('resume')} continues with the run's own settings; {setting(fixed[0])} cannot "
                         f"change (only {', '.join(setting(name) for name in RESUME_ADJUSTABLE)} can)")
    if os.path.isdir(directory):
        claim(directory)
    checkpoint = load_checkpoint(directory)
    _read_log(os.path.join(directory, LOG_FILE))  # a damaged log is refused before anything runs
    files.remove_leftovers(directory)  # of the run, killed while writing
    state = checkpoint.state
    trained_by = state["settings"].get("world_size") or 1  # runs from before MPI had one process
    if trained_by != world_size and not force:
        raise TrainError(f"this run was trained by {trained_by} rank(s) and is resumed by {world_size}: each rank "
                         f"draws its own batches, so it would not go on as it would have. Resume it with "
                         f"`mpiexec -n {trained_by}`{' (or without mpiexec)' if trained_by == 1 else ''}, or pass "
                         f"{setting('force')} to go on with {world_size} (other batches from here on)")
    zero_stage = state["settings"].get("zero", 0) if world_size > 1 else 0  # one process has no ranks to split over
    settings = dataclasses.replace(TrainSettings(**{**state["settings"], "world_size": world_size, "zero": zero_stage}),
                                   **changes)
    if settings.max_iters < state["step"]:
        raise TrainError(f"{setting('max_iters')} {settings.max_iters} is below the run's step {state['step']}")
    loaded = [checkpoint.params, checkpoint.base_params or {}, checkpoint.optimizer.m, checkpoint.optimizer.v]
    check_memory(checkpoint.config, settings, held=sum(array.nbytes for arrays in loaded for array in arrays.values()))
    data_path = data_path or state["data"]["path"]
    ids, info = _read_data(data.read_text(data_path), data_path, checkpoint.tokenizer, directory)
    if info["sha256"] != state["data"]["sha256"]:
        raise TrainError(f"{info['path']} is not the text this run was trained on (its contents differ)")
    if trained_by != world_size:
        warnings.warn(f"{directory} was trained by {trained_by} rank(s) and goes on with {world_size}: its batches "
                      "from here on differ from the uninterrupted run's", RunWarning)
    return dict(directory=directory, config=checkpoint.config, params=checkpoint.params,
                tokenizer=checkpoint.tokenizer, settings=settings, ids=ids, data_info=info,
                optimizer=checkpoint.optimizer, step=state["step"],
                rng_states=state.get("rng_states") or [state["rng_state"]],
                elapsed=state.get("elapsed_seconds", 0.0), base_params=checkpoint.base_params)


def claim(directory):
    """Make this process the only one training in directory, until run() returns or the process exits:
    run.lock holds its id. A lock whose process is gone (killed) is taken over; one whose process
    lives is refused."""
    path = os.path.join(directory, LOCK_FILE)
    while True:
        try:
            handle = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _lock_holder(path)
            if holder == os.getpid():
                return
            if holder is not None and _alive(holder):
                raise TrainError(f"{directory} is in use by another training run (process {holder}): one run "
                                 "per directory at a time") from None
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)  # its process is gone
            continue
        with os.fdopen(handle, "w") as file:
            file.write(str(os.getpid()))
        atexit.register(_release, path)
        return


def _lock_holder(path):
    try:
        with open(path) as file:
            return int(file.read().strip())
    except (OSError, ValueError):
        return None


def _alive(pid):
    try:
        os.kill(pid, 0)  # no signal: only whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _release(path):
    if _lock_holder(path) == os.getpid():
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


# ---- the loop ---------------------------------------------------------------------------------------
def run(training, should_stop=lambda: False, on_step=lambda report: None, on_eval=lambda step, means, text: None):
    """Train until max_iters (or should_stop() turns true: then save and return 'interrupted').
    Evaluates, samples and saves every eval_interval steps and at the end; logs every step to log.csv.
    A non-finite loss, gradient or evaluation raises TrainError before anything is saved, so the last
    checkpoint stays as it was. The directory is free for another process once it returns."""
    try:
        return _steps(training, should_stop, on_step, on_eval)
    finally:
        _release(os.path.join(training.directory, LOCK_FILE))


def _steps(training, should_stop, on_step, on_eval):
    """The loop on every rank of the job; rank 0 alone logs, reports and writes (the callbacks are its)."""
    world = training.world
    logs = []
    _on_root(world, lambda: logs.append(_Log(os.path.join(training.directory, LOG_FILE), after_step=training.step)))
    s = training.settings
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # non-finite values are caught below
        while training.step < s.max_iters:
            if world.broadcast(should_stop()):  # rank 0's signals stop every rank at the same step
                training.save()
                return "interrupted"
            report = training.train_step()
            _check_finite(training, {"the loss": report.loss, "the gradient norm": report.grad_norm}, report.step + 1)
            row = dataclasses.asdict(report)
            _on_root(world, lambda: on_step(report))
            evaluating = training.step % s.eval_interval == 0 or training.step == s.max_iters
            means = training.evaluate() if evaluating else None
            if evaluating:
                _check_finite(training, {f"the mean {split} loss": value for split, value in means.items()
                                         if value is not None}, training.step)
                row.update(train_loss=means["train"], val_loss=means["val"])

            def report_and_log():  # the log row before the save: a resume drops rows beyond its checkpoint
                if evaluating:
                    on_eval(training.step, means, training.sample())
                logs[0].write(row)
            _on_root(world, report_and_log)
            if evaluating:
                training.save()
    return "done"


def _check_finite(training, values, step):
    """Stop on a value that is not finite (every rank of a job has the same ones: rank 0 says it)."""
    for what, value in values.items():
        if not math.isfinite(value) and not training.world.is_root:
            raise distributed.Stopped()
        if not math.isfinite(value):
            kept = (f"the last checkpoint (step {training.saved_step}) in {training.directory} is kept"
                    if training.saved_step is not None else "no checkpoint had been written yet")
            raise TrainError(f"{what} became {value} at step {step}; training stopped and {kept}. Start again "
                             f"with a lower {setting('lr')} or {setting('grad_clip')} (and {setting('force')})")


def _read_log(path):
    """The log's rows (run_files.read_log); a damaged log stops the run before anything is written."""
    try:
        return run_files.read_log(path)
    except run_files.LogError as error:
        raise TrainError(f"{error.message()}; move it aside to go on with a new log") from None


class _Log:
    """log.csv, one row per step. Rows after `after_step` (left by an interrupted run) are dropped when a
    run resumes; the log is rewritten as a whole (files.replacing), so a kill never loses it."""

    def __init__(self, path, after_step):
        self.path = path
        kept = [row for row in _read_log(path) if int(row["step"]) <= after_step]
        with files.replacing(path) as temporary, open(temporary, "w", newline="") as file:
            writer = csv.DictWriter(file, LOG_FIELDS)
            writer.writeheader()
            writer.writerows(kept)

    def write(self, row):
        with files.full_disk_said(self.path, "its last row may be cut short (a resume drops it)"), \
                open(self.path, "a", newline="") as file:
            csv.DictWriter(file, LOG_FIELDS).writerow({key: "" if row.get(key) is None else row[key]
                                                       for key in LOG_FIELDS})


def plot_curves(directory):
    """curves.png from log.csv: training loss per step, and the evaluations. Returns its path, or None
    when matplotlib cannot be imported (a dependency, but an environment may lack it)."""
    try:  # here, not above: only the end of a run pays for importing it
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = _read_log(os.path.join(directory, LOG_FILE))
    figure, axes = plt.subplots(figsize=(8, 5))
    axes.plot([int(r["step"]) for r in rows], [float(r["loss"]) for r in rows], lw=0.6, alpha=0.5,
              label="train (batch)")
    evals = [r for r in rows if r["val_loss"] or r["train_loss"]]
    for key, label in (("train_loss", "train (eval)"), ("val_loss", "validation")):
        points = [(int(r["step"]), float(r[key])) for r in evals if r[key]]
        if points:
            axes.plot(*zip(*points), marker="o", label=label)
    axes.set(xlabel="step", ylabel="cross-entropy loss (nats/token)",
             title=os.path.basename(os.path.abspath(directory)))
    axes.legend()
    axes.grid(alpha=0.3)
    path = os.path.join(directory, CURVES_FILE)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
    return path


def evaluate_ids(params, config, ids, batch_size=8, on_batch=lambda: None):
    """Mean loss over a whole token stream, each token after the first predicted once, in batches of
    windows of the model's context (data.sequential_batch_count of them, on_batch() called after each).
    Returns (mean loss, number of predicted tokens)."""
    total, count = 0.0, 0
    for tokens, targets in data.sequential_windows(ids, config.max_position_embeddings, batch_size):
        n = int((targets != -100).sum())
        total += model.loss(params, config, tokens, targets) * n
        count += n
        on_batch()
    return total / count, count
