"""The train and eval commands: flags in, train.start / train.resume / train.run called, progress out."""
import math
import os
import shlex
import signal
import sys
import threading
import warnings

import click

from .. import adapters, backend, data, model, train as training
from ..config import PRESETS, human_bytes, human_count
from ..io import weights
from ..runtime import distributed
from .common import default, device_option, given, program, setting_option
from .progress import Progress

# flag -> the LlamaConfig field it sets for a new model
MODEL_FLAGS = {"dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
               "n_kv_heads": "num_key_value_heads", "hidden": "intermediate_size",
               "context": "max_position_embeddings", "tied": "tie_word_embeddings"}
SETTINGS = training.TrainSettings
READS_FILES = distributed.launched_size() == 1  # a job's rank 0 checks its files after MPI starts (_set_up)


def _lora_targets(ctx, param, value):
    """'q,v' or 'q_proj,v_proj' -> ('q_proj', 'v_proj')."""
    targets = tuple(name if name.endswith("_proj") else f"{name}_proj" for name in value.replace(" ", "").split(",")
                    if name)
    try:
        adapters.check_targets(targets)
    except ValueError:
        raise click.BadParameter(f"choose among {', '.join(t[:-len('_proj')] for t in adapters.TARGETS)}, "
                                 f"got {value!r}") from None
    return targets


def _setting(name, kind, **options):
    return setting_option(SETTINGS, name, kind, **options)


@click.command("train")
@click.option("--data", "data_path", type=click.Path(exists=READS_FILES, dir_okay=False),
              help="A UTF-8 text file. Default: the built-in corpus, "
              "npllama/corpus/shakespeare-sample.txt (about 100 KB of Shakespeare, no download).")
@click.option("--out", type=click.Path(),
              help="The run directory (checkpoints, log.csv, curves.png). Default: runs/DATA-NAME.")
@click.option("--tokenizer", "tokenizer_spec", help="char (default for a new model), bpe:N (train a SentencePiece "
              "BPE of N pieces on the data) or PATH.model. With --init, the model's own.")
@click.option("--init", "init_path", type=click.Path(exists=READS_FILES),
              help="Start from these weights (a weights file or HF directory): continued "
              "pre-training or fine-tuning with the model's tokenizer.")
@click.option("--resume", is_flag=True, help="Continue the run in --out exactly where its checkpoint stopped.")
@click.option("--force", is_flag=True, help="Start a new run in --out even if one is there (its files are moved to "
              "--out/previous-N); with --resume, go on with another number of MPI ranks than the run had.")
@click.option("--preset", type=click.Choice(list(PRESETS)), help=f"Model shape (default {training.DEFAULT_SHAPE}'s, "
              "with the vocabulary of the tokenizer).")
@click.option("--dim", type=click.IntRange(min=2), help="Hidden size (values per token).")
@click.option("--n-layers", type=click.IntRange(min=1), help="Transformer blocks.")
@click.option("--n-heads", type=click.IntRange(min=1), help="Attention heads (each of --dim / --n-heads values).")
@click.option("--n-kv-heads", type=click.IntRange(min=1), help="Key/value heads (GQA); default --n-heads.")
@click.option("--hidden", type=click.IntRange(min=1), help="SwiGLU intermediate size.")
@click.option("--context", type=click.IntRange(min=1), help="Context length in tokens (one training window).")
@click.option("--tied/--untied", default=None, help="Share the embedding with the output head.")
@_setting("batch_size", click.IntRange(min=1), help="Windows of --context tokens per micro-batch.")
@_setting("grad_accum", click.IntRange(min=1), help="Micro-batches per optimizer step.")
@_setting("max_iters", click.IntRange(min=1), help="Optimizer steps: the run's last step.")
@_setting("lr", click.FloatRange(min=0, min_open=True), help="Peak learning rate, reached after --warmup steps, "
          "then cosine-decayed to --min-lr at --max-iters.")
@_setting("min_lr", click.FloatRange(min=0), help="Learning rate at the end of the decay.")
@_setting("warmup", click.IntRange(min=0), help="Steps of linear warm-up from 0 to --lr.")
@_setting("weight_decay", click.FloatRange(min=0), help="AdamW's decoupled decay of the matrices, per unit of "
          "learning rate.")
@_setting("beta1", click.FloatRange(0, 1, max_open=True), help="AdamW's decay of the gradient's running mean.")
@_setting("beta2", click.FloatRange(0, 1, max_open=True), help="AdamW's decay of the squared gradient's running mean.")
@_setting("grad_clip", click.FloatRange(min=0), help="Largest global gradient norm (larger ones are scaled "
          "down to it); 0 disables.")
@_setting("eval_interval", click.IntRange(min=1), help="Steps between evaluations; each also saves a checkpoint "
          "and prints a sample.")
@_setting("eval_iters", click.IntRange(min=1), help="Batches averaged per split at each evaluation.")
@_setting("val_fraction", click.FloatRange(0, 1, max_open=True), help="The last part of the data kept for validation.")
@_setting("seed", int, help="Seed of the initial weights, the batches' order and the samples.")
@_setting("sample_tokens", click.IntRange(min=0), help="Tokens generated at each evaluation.")
@device_option
@_setting("dtype", click.Choice(["fp32", "fp64"]), help="Parameters and optimizer state.")
@_setting("lora_rank", click.IntRange(min=0),
          help="With --init: train LoRA adapters of this rank on the frozen model (0: train every weight).")
@click.option("--lora-alpha", type=click.FloatRange(min=0, min_open=True),
              help="Adapters are scaled by alpha / rank (default alpha = rank).")
@click.option("--lora-targets", default=",".join(name[:-len("_proj")] for name in default(SETTINGS, "lora_targets")),
              show_default=True, callback=_lora_targets, help="Projections that get adapters, among q,k,v,o,gate,up,down.")
@click.option("--workers", type=click.IntRange(min=1), help="Shards per batch, their gradients summed across "
              "workers (processes on the CPU's cores); recorded, so a resumed run sums the same. Default: "
              "NPLLAMA_WORKERS when set, else the usable cores (1 on a GPU), shared by an MPI job's ranks on "
              "one machine.")
@_setting("zero", click.IntRange(0, 1), help="Under mpiexec: 1 splits AdamW's state across the ranks (ZeRO stage 1: "
          "each keeps 1/ranks of it); 0 keeps it whole on every rank.")
@_setting("recompute", bool, is_flag=True, help="Keep only each block's input in the forward pass and compute the "
          "rest again in the backward pass: far less memory, about a third more compute.")
@click.pass_context
def train_command(ctx, data_path, out, tokenizer_spec, init_path, resume, force, preset, device, **flags):
    """Train a Llama on a text file: checkpoints, log.csv and curves.png in the run directory."""
    world = distributed.world()
    if not world.is_root:  # rank 0 speaks for the job
        sys.stdout = open(os.devnull, "w")
        warnings.simplefilter("ignore")
    world.check_same("flags", {max(option.opts, key=len): ctx.params[option.name] for option in ctx.command.params})
    model_settings = {MODEL_FLAGS[name]: flags.pop(name) for name in MODEL_FLAGS}
    if init_path:  # the model's shape is given; --context only shortens the training windows
        flags["context"] = model_settings.pop("max_position_embeddings")
    out = out or os.path.join("runs", os.path.splitext(os.path.basename(data_path or data.BUILTIN_CORPUS))[0])
    settings = world.agree(lambda: _set_up(ctx, world, device, data_path, init_path, resume, flags))
    if resume:
        run = training.resume(out, data_path, force, **_given_settings(ctx, flags, tokenizer_spec, init_path, preset))
    else:
        run = training.start(out, data_path, tokenizer_spec, preset, model_settings, settings, force)
    if run.settings.lora_rank:
        trained = sum(int(value.size) for value in run.params.values())
        click.echo(f"LoRA rank {run.settings.lora_rank} (alpha {run.settings.lora_alpha:g}) on "
                   f"{', '.join(run.settings.lora_targets)}: {human_count(trained)} trained parameters")
    click.echo(f"{out}: {human_count(run.config.num_parameters())} parameters, {run.tokenizer.describe()}, "
               f"{len(run.train_ids):,} training and {len(run.val_ids):,} validation tokens; "
               f"step {run.step} of {run.settings.max_iters}; {run.settings.workers} worker(s); {backend.describe()}; "
               f"memory about {human_bytes(sum(training.memory_needed(run.config, run.settings).values()))}"
               f"{' a rank' if world.size > 1 else ''}")
    if world.size > 1:
        s = run.settings
        click.echo(f"{world.size} MPI ranks × batch {s.batch_size} × accumulation {s.grad_accum} = global batch of "
                   f"{run.global_batch} windows of {run.context} tokens; ZeRO stage {s.zero}: AdamW's state "
                   f"{human_bytes(training.memory_needed(run.config, s)['AdamW moments'])} a rank")
    _train_with_progress(run, out, world)


def _set_up(ctx, world, device, data_path, init_path, resume, flags):
    """What may fail before a run starts, on every rank of a job at once (world.agree): the input files
    (rank 0 reads them; alone, click checked them already), the flags' own checks, this rank's device.
    Returns a new run's settings (None when resuming)."""
    if world.is_root and not READS_FILES:
        for name, path, kind in (("--data", data_path, "File"), ("--init", init_path, "Path")):
            if path and not os.path.exists(path):
                raise click.BadParameter(f"{kind} {click.format_filename(path)!r} does not exist.", param_hint=f"'{name}'")
    if not flags["lora_rank"] and (given(ctx, "lora_alpha") or given(ctx, "lora_targets")):
        raise click.ClickException("--lora-alpha and --lora-targets shape LoRA adapters: give --lora-rank too")
    backend.use(device)
    return None if resume else SETTINGS(**flags, init=init_path)


def _given_settings(ctx, flags, tokenizer_spec, init_path, preset):
    """The settings the user gave on the command line, by the library's names (train.resume refuses
    those that would change the updates)."""
    named = {"context": "context", "tokenizer_spec": "tokenizer", "init_path": "init", "preset": "preset",
             **{flag: field for flag, field in MODEL_FLAGS.items() if flag != "context"}, **{n: n for n in flags}}
    values = {**flags, "tokenizer_spec": tokenizer_spec, "init_path": init_path, "preset": preset}
    return {named[name]: ctx.params.get(name, values.get(name)) for name in named if given(ctx, name)}


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # Ctrl-C; docker stop, timeout and schedulers


def _train_with_progress(run, out, world):
    """The loop with a progress bar; Ctrl-C or SIGTERM finishes the step, saves a checkpoint and exits
    with 128 + the signal's number (a second one: at once). Under MPI a signal stops at once
    (_stop_at_once)."""
    interrupted = []

    def on_interrupt(signum, frame):
        interrupted.append(signum)
        _restore(previous)  # a second signal stops without waiting
    if world.size > 1:
        previous = _stop_at_once(run, out, world)
    else:
        previous = {number: signal.signal(number, on_interrupt) for number in STOP_SIGNALS}

    def show(report):
        return f"loss {report.loss:.4f}  lr {report.lr:.2e}  {report.tokens_per_second:,.0f} tok/s"

    def on_eval(step, means, sample):
        val = "n/a" if means["val"] is None else f"{means['val']:.4f}"
        click.echo(f"\nstep {step}: train loss {means['train']:.4f}, val loss {val}")
        if sample:
            click.echo("  " + sample.strip().replace("\n", "\n  "))

    try:
        with Progress(run.settings.max_iters, "training", "step", start=run.step, describe=show,
                      stream=None if world.is_root else sys.stdout) as progress:
            outcome = training.run(run, should_stop=lambda: bool(interrupted), on_step=progress.update,
                                   on_eval=on_eval)
    finally:
        _restore(previous)
    if not world.is_root:
        return
    if outcome == "interrupted":
        click.echo(f"interrupted at step {run.step}: checkpoint saved; continue with "
                   f"`{program()} train --out {shlex.quote(out)} --resume`", err=True)
        sys.exit(128 + interrupted[0])
    curves = training.plot_curves(out)
    click.echo(f"done: step {run.step}; wrote {run.checkpoint_file} and {os.path.join(out, training.LOG_FILE)}")
    click.echo(f"wrote {curves}" if curves else "matplotlib is not installed: no curves.png "
               "(pip install matplotlib); the losses are in log.csv")
    _suggest_next(run, out)


def _suggest_next(run, out):
    """The commands to sample from the trained model and to train it longer."""
    model = f"{shlex.quote(run.settings.init)} --lora {shlex.quote(run.checkpoint_file)}" if run.settings.lora_rank \
        else shlex.quote(out)
    opening = run.tokenizer.decode([int(i) for i in run.train_ids[:16]]).strip().split("\n")[0][:24]
    click.echo(f"next:\n  {program()} generate --weights {model} --prompt {shlex.quote(opening or 'The')}"
               f"  # sample from it\n"
               f"  {_launcher(run.world)}{program()} train --out {shlex.quote(out)} --resume --max-iters "
               f"{2 * run.settings.max_iters}  # train longer")


def _launcher(world):
    """What starts the job again: `mpiexec -n N ` for a job of N ranks, nothing for one process."""
    return f"mpiexec -n {world.size} " if world.size > 1 else ""


def _stop_at_once(run, out, world):
    """A job's stop signal ends this rank at once, rank 0 saying in one line what is kept. mpiexec sends
    SIGTERM to every rank when one ends or when it is interrupted, and kills them all a moment later;
    meanwhile the main thread may wait inside MPI for a rank that is gone, where no Python handler
    runs. So the handlers do nothing but wake (through the signal wakeup fd) a thread that speaks and
    exits. Returns the handlers replaced."""
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)

    def watch():
        signum = os.read(wake_read, 1)[0]
        if world.is_root:
            kept = (f"the checkpoint of step {run.saved_step} in {out} is kept" if run.saved_step is not None
                    else "no checkpoint had been written yet")
            sys.stderr.write(f"Error: the job stopped at step {run.step} (a rank ended, or mpiexec was "
                             f"interrupted); {kept}; continue with `{_launcher(world)}{program()} train "
                             f"--out {shlex.quote(out)} --resume`\n")
            sys.stderr.flush()
        os._exit(128 + signum)
    threading.Thread(target=watch, daemon=True).start()
    return {number: signal.signal(number, lambda signum, frame: None) for number in STOP_SIGNALS}


def _restore(handlers):
    for number, handler in handlers.items():
        signal.signal(number, handler)


@click.command("eval")
@click.option("-m", "--weights", "weights_path", required=True, type=click.Path(exists=True),
              help="An npllama weights file, a run directory, an HF or Meta directory, a GGUF or llama2.c file.")
@click.option("--data", "data_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="A UTF-8 text file.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Windows of the model's context per forward pass.")
@device_option
def eval_command(weights_path, data_path, batch_size, device):
    """Mean loss and perplexity of a model over a whole text file (with the model's tokenizer)."""
    backend.use(device)
    config, params, tokenizer = weights.load(weights_path)
    if tokenizer is None:
        raise click.ClickException(f"{weights_path} has no tokenizer to read the text with")
    text = data.read_text(data_path)
    data.check_coverage(tokenizer, text, f"the tokenizer of {weights_path}", data_path)
    ids = tokenizer.encode(text, special=False)
    if len(ids) < 2:
        raise click.ClickException(f"{data_path} holds {len(ids)} token(s): nothing to predict")
    batches = data.sequential_batch_count(len(ids), config.max_position_embeddings, batch_size)
    with Progress(batches, "evaluating", "batch") as progress:
        mean, count = training.evaluate_ids(model.trainable(params), config, ids, batch_size, progress.update)
    click.echo(f"loss {mean:.4f} nats/token, perplexity {math.exp(mean):.3f}, over {count:,} tokens")


COMMANDS = [train_command, eval_command]
