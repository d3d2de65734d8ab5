#!/usr/bin/env python3
"""npllama's command line: parses flags, calls the library, prints. No math lives here."""
import dataclasses
import hashlib
import math
import os
import shutil
import signal
import sys

import click
import numpy as np

from npllama import (backend, classify, data, generation, init_params, lora,
                     tokenizer as tokenizers, train as training, weights)
from npllama.config import PRESETS, ConfigError, LlamaConfig, human_count
from npllama.safetensors_file import SafetensorsError

# Errors that mean bad input: printed as one line ("Error: ..."), exit status 1, no traceback.
USER_ERRORS = (weights.WeightsError, generation.GenerationError, tokenizers.TokenizerError,
               backend.BackendError, ConfigError, SafetensorsError, data.DataError, training.TrainError,
               classify.ClassifyError)


class _Commands(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except USER_ERRORS as error:
            raise click.ClickException(str(error)) from None
        except OSError as error:  # unreadable files, full disks: the system's reason is the message
            raise click.ClickException(f"{error.filename or ''}: {error.strerror or error}".lstrip(": ")) from None


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """npllama: LLaMA in NumPy/CuPy with every forward and backward pass written out.

    Run `python cli.py COMMAND --help` for a command's options."""


@main.command()
def presets():
    """List the named model configurations (usable wherever a preset is asked for)."""
    click.echo(f"{'name':<18}{'params':>8}{'dim':>7}{'layers':>8}{'heads':>7}{'kv':>5}{'hidden':>8}"
               f"{'vocab':>8}{'context':>9}  tied")
    for name in PRESETS:
        c = LlamaConfig.preset(name)
        click.echo(f"{name:<18}{human_count(c.num_parameters()):>8}{c.hidden_size:>7}"
                   f"{c.num_hidden_layers:>8}{c.num_attention_heads:>7}{c.num_key_value_heads:>5}"
                   f"{c.intermediate_size:>8}{c.vocab_size:>8}{c.max_position_embeddings:>9}"
                   f"  {'yes' if c.tie_word_embeddings else 'no'}")


def _refuse_to_overwrite(path, force):
    if os.path.isdir(path):
        raise click.ClickException(f"{path} is a directory; --out names the weights file to write")
    if os.path.exists(path) and not force:
        raise click.ClickException(f"{path} exists; pass --force to overwrite it")


@main.command("load-weights")
@click.argument("source")
@click.option("--out", required=True, help="The npllama weights file to write (e.g. weights/7b.safetensors).")
@click.option("--tokenizer", "tokenizer_path", help="A SentencePiece .model to embed (replaces the source's).")
@click.option("--dtype", type=click.Choice(["keep", "fp32", "fp16", "bf16"]), default="keep", show_default=True,
              help="Dtype to store the tensors in.")
@click.option("--force", is_flag=True, help="Overwrite --out if it exists.")
def load_weights(source, out, tokenizer_path, dtype, force):
    """Import SOURCE into one npllama weights file (config and tokenizer embedded).

    SOURCE is an HF checkpoint directory (config.json, model.safetensors or sharded with an index,
    tokenizer.model), a Meta directory (params.json, consolidated.NN.pth, tokenizer.model; read without
    torch), a llama2.c .bin (legacy, or versioned 'ak42' v1/v2), or an npllama weights file."""
    _refuse_to_overwrite(out, force)
    config, params, tokenizer = weights.load(source, tokenizer_path)
    if os.path.dirname(out):
        os.makedirs(os.path.dirname(out), exist_ok=True)
    weights.save(out, config, params, tokenizer, dtype=None if dtype == "keep" else dtype)
    click.echo(f"wrote {out}")
    click.echo(weights.describe(*weights.load(out), path=out))


@main.command()
@click.argument("weights_path", metavar="WEIGHTS")
def info(weights_path):
    """Summarise a weights file or checkpoint: parameters, shape, dtype, tokenizer."""
    on_disk = None if os.path.isdir(weights_path) else weights_path
    click.echo(weights.describe(*weights.load(weights_path), path=on_disk))


@main.command("export-hf")
@click.argument("weights_path", metavar="WEIGHTS")
@click.argument("outdir")
@click.option("--force", is_flag=True, help="Write into OUTDIR even if it is not empty.")
def export_hf(weights_path, outdir, force):
    """Write WEIGHTS as an HF transformers directory (config.json, model.safetensors, tokenizer.model)."""
    if os.path.exists(outdir) and not os.path.isdir(outdir):
        raise click.ClickException(f"{outdir} is a file; OUTDIR names the directory to write")
    if os.path.isdir(outdir) and os.listdir(outdir) and not force:
        raise click.ClickException(f"{outdir} is not empty; pass --force to write into it")
    config, params, tokenizer = weights.load(weights_path)
    weights.export_hf(outdir, config, params, tokenizer)
    sentencepiece = isinstance(tokenizer, tokenizers.SentencePieceTokenizer)
    click.echo(f"wrote {outdir} (config.json, model.safetensors{', tokenizer.model' if sentencepiece else ''})")
    if tokenizer is not None and not sentencepiece:
        click.echo(f"note: HF has no tokenizer format for {tokenizer.describe()}; keep using {weights_path} "
                   "to encode and decode", err=True)


@main.command("merge-lora")
@click.argument("weights_path", metavar="WEIGHTS")
@click.argument("adapters_path", metavar="ADAPTERS")
@click.option("--out", required=True, help="The standalone weights file to write.")
@click.option("--force", is_flag=True, help="Overwrite --out if it exists.")
def merge_lora(weights_path, adapters_path, out, force):
    """Fold LoRA ADAPTERS (a run's adapters.safetensors) into WEIGHTS: W' = W + (alpha/r)·B A."""
    _refuse_to_overwrite(out, force)
    config, params, tokenizer = weights.load(weights_path)
    adapters, info = weights.load_adapters(adapters_path, config)
    weights.save(out, config, weights.merge_adapters(params, adapters, info["alpha"] / info["rank"]), tokenizer)
    click.echo(f"wrote {out}: {len(adapters) // 2} adapters of rank {info['rank']} merged into {weights_path}")


def _parse_ids(text):
    try:
        return [int(part) for part in text.replace(",", " ").split()]
    except ValueError:
        raise click.ClickException(f"--prompt-ids must be integers separated by spaces or commas, got {text!r}") \
            from None


@main.command(name="generate")
@click.option("--weights", "weights_path", required=True, help="An npllama weights file or HF checkpoint directory.")
@click.option("--prompt", help="Text to continue (needs a tokenizer in the weights).")
@click.option("--prompt-ids", help="Token ids to continue, e.g. '1 450 4996', for weights without a tokenizer.")
@click.option("-n", "--max-new-tokens", type=click.IntRange(min=0), default=256, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="0 picks the most likely token (greedy).")
@click.option("--top-k", type=click.IntRange(min=1), help="Sample among the k most likely tokens.")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), help="Sample within this probability mass.")
@click.option("--seed", type=int, help="Seed for sampling (same seed, same text).")
@click.option("--device", type=click.Choice(backend.DEVICES), default="auto", show_default=True)
@click.option("--dtype", type=click.Choice(["auto", "fp32", "fp16"]), default="auto", show_default=True,
              help="Compute dtype; auto: fp32 on the CPU, fp16 weights stay fp16 on a GPU.")
@click.option("--tokenizer", "tokenizer_path", help="A SentencePiece .model to use instead of the embedded one.")
@click.option("--lora", "lora_path", help="LoRA adapters (a run's adapters.safetensors) to apply, unmerged.")
def generate_command(weights_path, prompt, prompt_ids, max_new_tokens, temperature, top_k, top_p, seed, device,
                     dtype, tokenizer_path, lora_path):
    """Continue a prompt, streaming text to stdout; a summary line goes to stderr."""
    if (prompt is None) == (prompt_ids is None):
        raise click.ClickException("give exactly one of --prompt and --prompt-ids")
    backend.use(device)
    config, params, tokenizer = weights.load(weights_path, tokenizer_path)
    if lora_path:
        adapters, info = weights.load_adapters(lora_path, config)
        params = lora.attach(params, adapters, info["alpha"] / info["rank"])
    if prompt is not None and tokenizer is None:
        raise click.ClickException(f"{weights_path} has no tokenizer: pass --tokenizer PATH.model, "
                                   "or give token ids with --prompt-ids")
    ids = _parse_ids(prompt_ids) if prompt_ids is not None else \
        tokenizer.encode(prompt, bos=tokenizer.bos_id is not None)
    eos_id = tokenizer.eos_id if tokenizer is not None else config.to_dict().get("eos_token_id")
    tokens, stats = generation.stream(params, config, ids, max_new_tokens, temperature, top_k, top_p, seed,
                                      eos_id=eos_id, dtype=None if dtype == "auto" else dtype)
    if prompt_ids is not None or tokenizer is None:
        _print_ids(ids, tokens)
    else:
        _print_text(tokenizer, ids, tokens)
    click.echo(stats.summary() + f"; {backend.describe()}", err=True)


def _print_text(tokenizer, prompt_ids, tokens):
    """The prompt, then each new token's text as soon as it is complete (exactly decode(all ids))."""
    decoder = tokenizer.stream_decoder()
    click.echo("".join(decoder.push(token) for token in prompt_ids), nl=False)
    for token in tokens:
        click.echo(decoder.push(token), nl=False)
        sys.stdout.flush()
    click.echo(decoder.flush())


def _print_ids(prompt_ids, tokens):
    click.echo(" ".join(map(str, prompt_ids)), nl=False)
    for token in tokens:
        click.echo(f" {token}", nl=False)
        sys.stdout.flush()
    click.echo()



# ---- training -------------------------------------------------------------------------------------
DEFAULT_SHAPE = "shakespeare-char"  # nanoGPT's CPU recipe as a Llama; the vocabulary comes from the data
MODEL_FLAGS = {"dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
               "n_kv_heads": "num_key_value_heads", "hidden": "intermediate_size",
               "context": "max_position_embeddings", "tied": "tie_word_embeddings"}
TRAIN_FLAGS = [field.name for field in dataclasses.fields(training.TrainSettings)
               if field.name not in ("decay_iters", "init")]


def _lora_targets(ctx, param, value):
    """'q,v' or 'q_proj,v_proj' -> ('q_proj', 'v_proj')."""
    targets = tuple(name if name.endswith("_proj") else f"{name}_proj" for name in value.replace(" ", "").split(",")
                    if name)
    try:
        lora.check_targets(targets)
    except ValueError:
        raise click.BadParameter(f"choose among {', '.join(t[:-len('_proj')] for t in lora.TARGETS)}, "
                                 f"got {value!r}") from None
    return targets


def _given(ctx, name):
    return ctx.get_parameter_source(name) != click.core.ParameterSource.DEFAULT


@main.command("train")
@click.option("--data", "data_path", help="A UTF-8 text file. Default: the built-in corpus, "
              "npllama/corpus/shakespeare-sample.txt (about 100 KB of Shakespeare, no download).")
@click.option("--out", help="The run directory (checkpoints, log.csv, curves.png). Default: runs/DATA-NAME.")
@click.option("--tokenizer", "tokenizer_spec", help="char (default for a new model), bpe:N (train a SentencePiece "
              "BPE of N pieces on the data) or PATH.model. With --init, the model's own.")
@click.option("--init", "init_path", help="Start from these weights (a weights file or HF directory): continued "
              "pre-training or fine-tuning with the model's tokenizer.")
@click.option("--resume", is_flag=True, help="Continue the run in --out exactly where its checkpoint stopped.")
@click.option("--force", is_flag=True, help="Start a new run in --out even if one is there (overwrites it).")
@click.option("--preset", type=click.Choice(list(PRESETS)), help=f"Model shape (default {DEFAULT_SHAPE}'s, "
              "with the vocabulary of the tokenizer).")
@click.option("--dim", type=click.IntRange(min=2), help="Hidden size.")
@click.option("--n-layers", type=click.IntRange(min=1))
@click.option("--n-heads", type=click.IntRange(min=1))
@click.option("--n-kv-heads", type=click.IntRange(min=1), help="Key/value heads (GQA); default --n-heads.")
@click.option("--hidden", type=click.IntRange(min=1), help="SwiGLU intermediate size.")
@click.option("--context", type=click.IntRange(min=1), help="Context length (tokens per training window).")
@click.option("--tied/--untied", default=None, help="Share the embedding with the output head.")
@click.option("--batch-size", type=click.IntRange(min=1), default=12, show_default=True)
@click.option("--grad-accum", type=click.IntRange(min=1), default=1, show_default=True,
              help="Micro-batches per optimizer step.")
@click.option("--max-iters", type=click.IntRange(min=1), default=2000, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True)
@click.option("--min-lr", type=click.FloatRange(min=0), default=1e-4, show_default=True)
@click.option("--warmup", type=click.IntRange(min=0), default=100, show_default=True)
@click.option("--weight-decay", type=click.FloatRange(min=0), default=0.1, show_default=True)
@click.option("--beta1", type=click.FloatRange(0, 1, max_open=True), default=0.9, show_default=True)
@click.option("--beta2", type=click.FloatRange(0, 1, max_open=True), default=0.99, show_default=True)
@click.option("--grad-clip", type=click.FloatRange(min=0), default=1.0, show_default=True, help="0 disables.")
@click.option("--eval-interval", type=click.IntRange(min=1), default=250, show_default=True)
@click.option("--eval-iters", type=click.IntRange(min=1), default=200, show_default=True)
@click.option("--val-fraction", type=click.FloatRange(0, 1, max_open=True), default=0.1, show_default=True,
              help="The last part of the data kept for validation.")
@click.option("--seed", type=int, default=1337, show_default=True)
@click.option("--sample-tokens", type=click.IntRange(min=0), default=200, show_default=True,
              help="Tokens generated at each evaluation.")
@click.option("--device", type=click.Choice(backend.DEVICES), default="auto", show_default=True)
@click.option("--dtype", type=click.Choice(["fp32", "fp64"]), default="fp32", show_default=True,
              help="Parameters and optimizer state.")
@click.option("--lora-rank", type=click.IntRange(min=0), default=0, show_default=True,
              help="With --init: train LoRA adapters of this rank on the frozen model (0: train every weight).")
@click.option("--lora-alpha", type=click.FloatRange(min=0, min_open=True),
              help="Adapters are scaled by alpha / rank (default alpha = rank).")
@click.option("--lora-targets", default="q,v", show_default=True, callback=_lora_targets,
              help="Projections that get adapters, among q,k,v,o,gate,up,down.")
@click.pass_context
def train_command(ctx, data_path, out, tokenizer_spec, init_path, resume, force, preset, **flags):
    """Train a Llama on a text file: checkpoints, log.csv and curves.png in the run directory."""
    if not flags["lora_rank"] and (_given(ctx, "lora_alpha") or _given(ctx, "lora_targets")):
        raise click.ClickException("--lora-alpha and --lora-targets shape LoRA adapters: give --lora-rank too")
    backend.use(flags.pop("device"))
    model_flags = {name: flags.pop(name) for name in MODEL_FLAGS}
    if init_path:  # the model's shape is given; --context only shortens the training windows
        flags["context"] = model_flags.pop("context")
    settings = training.TrainSettings(**{name: flags.get(name) for name in TRAIN_FLAGS},
                                      init=os.path.abspath(init_path) if init_path else None)
    data_path = data_path or data.BUILTIN_CORPUS
    out = out or os.path.join("runs", os.path.splitext(os.path.basename(data_path))[0])
    if os.path.exists(out) and not os.path.isdir(out):
        raise click.ClickException(f"--out {out} is a file; it names the run directory")
    if resume:
        if force:
            raise click.ClickException("--resume continues the run in --out and --force starts it over: choose one")
        run = _resume(ctx, out, data_path if _given(ctx, "data_path") else None, settings)
    else:
        if (preset or any(v is not None for v in model_flags.values())) and init_path:
            raise click.ClickException("--init takes the model's own shape: drop --preset and the model flags "
                                       "(--context may shorten the training windows)")
        if os.path.exists(os.path.join(out, training.OPTIMIZER_FILE)) and not force:
            raise click.ClickException(f"{out} already holds a training run; pass --resume to continue it, "
                                       "or --force to start over")
        run = _start_in_new_directory(out, data_path, tokenizer_spec, init_path, preset, model_flags, settings)
    if run.settings.lora_rank:
        trained = sum(int(value.size) for value in run.params.values())
        click.echo(f"LoRA rank {run.settings.lora_rank} (alpha {run.settings.lora_alpha:g}) on "
                   f"{', '.join(run.settings.lora_targets)}: {human_count(trained)} trained parameters")
    click.echo(f"{out}: {human_count(run.config.num_parameters())} parameters, {run.tokenizer.describe()}, "
               f"{len(run.train_ids):,} training and {len(run.val_ids):,} validation tokens; "
               f"step {run.step} of {run.settings.max_iters}; {backend.describe()}")
    _train_with_progress(run, out)


def _read_data(text, data_path, tokenizer, out, tokenizer_name="the tokenizer"):
    data.check_coverage(tokenizer, text, tokenizer_name, data_path)
    info = {"path": os.path.abspath(data_path), "sha256": hashlib.sha256(text.encode()).hexdigest()}
    return data.token_ids(text, tokenizer, out), info


def _start_in_new_directory(out, *args):
    """_start, removing the run directory again if it was made for a run that could not start."""
    made = not os.path.exists(out)
    os.makedirs(out, exist_ok=True)
    try:
        return _start(out, *args)
    except BaseException:
        if made:
            shutil.rmtree(out, ignore_errors=True)
        raise


def _start(out, data_path, tokenizer_spec, init_path, preset, model_flags, settings):
    text = data.read_text(data_path)
    if init_path:
        config, params, tokenizer = weights.load(init_path)
        if tokenizer is None:
            raise click.ClickException(f"{init_path} has no tokenizer to read the data with")
        if tokenizer_spec:
            raise click.ClickException("--init trains with the model's own tokenizer: drop --tokenizer")
    else:
        tokenizer = data.make_tokenizer(tokenizer_spec or "char", text, out)
        fields = LlamaConfig.preset(preset or DEFAULT_SHAPE).to_dict()
        fields.update({MODEL_FLAGS[name]: value for name, value in model_flags.items() if value is not None})
        if model_flags["n_heads"] is not None and model_flags["n_kv_heads"] is None:
            fields["num_key_value_heads"] = model_flags["n_heads"]
        config = LlamaConfig.from_dict({**fields, "vocab_size": tokenizer.vocab_size})
        params = init_params(config, seed=settings.seed)
    ids, info = _read_data(text, data_path, tokenizer, out,
                           f"the tokenizer of {init_path}" if init_path else "the tokenizer")
    params = training.trainable(params, settings.dtype)
    if not settings.lora_rank:
        return training.TrainingRun(out, config, params, tokenizer, settings, ids, info)
    adapters = lora.init_adapters(params, config, settings.lora_targets, settings.lora_rank, settings.lora_alpha,
                                  settings.seed)
    return training.TrainingRun(out, config, adapters, tokenizer, settings, ids, info, base_params=params)


RESUME_ADJUSTABLE = ("max_iters", "eval_interval", "eval_iters", "sample_tokens")  # no effect on the updates


def _resume(ctx, out, data_path, settings):
    fixed = [name for name in TRAIN_FLAGS + list(MODEL_FLAGS) + ["tokenizer_spec", "init_path", "preset"]
             if name not in RESUME_ADJUSTABLE and _given(ctx, name)]
    if fixed:
        flag = "--" + fixed[0].replace("_spec", "").replace("_path", "").replace("_", "-")
        raise click.ClickException(f"--resume continues with the run's own settings; {flag} cannot change "
                                   f"(only {', '.join('--' + n.replace('_', '-') for n in RESUME_ADJUSTABLE)} can)")
    checkpoint = training.load_checkpoint(out)
    state = checkpoint.state
    saved = training.TrainSettings(**state["settings"])
    for name in RESUME_ADJUSTABLE:  # e.g. train longer: the cosine still ends at the saved decay_iters
        if _given(ctx, name):
            setattr(saved, name, getattr(settings, name))
    if saved.max_iters < state["step"]:
        raise click.ClickException(f"--max-iters {saved.max_iters} is below the run's step {state['step']}")
    data_path = data_path or state["data"]["path"]
    ids, info = _read_data(data.read_text(data_path), data_path, checkpoint.tokenizer, out)
    if info["sha256"] != state["data"]["sha256"]:
        raise click.ClickException(f"{info['path']} is not the text this run was trained on (its contents differ)")
    return training.TrainingRun(out, checkpoint.config, checkpoint.params, checkpoint.tokenizer, saved, ids, info,
                                checkpoint.optimizer, state["step"], state["rng_state"],
                                state.get("elapsed_seconds", 0.0), checkpoint.base_params)


def _train_with_progress(run, out):
    """The loop with a progress bar; Ctrl-C saves a checkpoint and exits cleanly (twice: at once)."""
    interrupted = []

    def on_interrupt(signum, frame):
        interrupted.append(signum)
        signal.signal(signal.SIGINT, previous)  # a second Ctrl-C stops without waiting
    previous = signal.signal(signal.SIGINT, on_interrupt)

    def show(report):
        return "" if report is None else \
            f"loss {report.loss:.4f}  lr {report.lr:.2e}  {report.tokens_per_second:,.0f} tok/s"

    def on_eval(step, means, sample):
        val = "n/a" if means["val"] is None else f"{means['val']:.4f}"
        click.echo(f"\nstep {step}: train loss {means['train']:.4f}, val loss {val}")
        if sample:
            click.echo("  " + sample.strip().replace("\n", "\n  "))

    try:
        with click.progressbar(length=run.settings.max_iters - run.step, label="training", file=sys.stderr,
                               item_show_func=show, show_eta=True) as bar:
            outcome = training.run(run, should_stop=lambda: bool(interrupted),
                                   on_step=lambda report: bar.update(1, report), on_eval=on_eval)
    finally:
        signal.signal(signal.SIGINT, previous)
    if outcome == "interrupted":
        click.echo(f"interrupted at step {run.step}: checkpoint saved; continue with "
                   f"`python cli.py train --out {out} --resume`", err=True)
        sys.exit(130)
    curves = training.plot_curves(out)
    click.echo(f"done: step {run.step}; wrote {run.checkpoint_file} and {os.path.join(out, training.LOG_FILE)}")
    click.echo(f"wrote {curves}" if curves else "matplotlib is not installed: no curves.png "
               "(pip install matplotlib); the losses are in log.csv")


@main.command("classify")
@click.option("--weights", "weights_path", required=True, help="A weights file or HF checkpoint directory.")
@click.option("--mode", type=click.Choice(["zero-shot", "finetune"]), required=True)
@click.option("--train", "train_path", help="Training examples, `label ||| text` lines (finetune).")
@click.option("--dev", "dev_path", required=True, help="Development examples: accuracy each epoch, best epoch kept.")
@click.option("--test", "test_path", help="Test examples (accuracy printed when they carry labels).")
@click.option("--label-names", "label_names_path", required=True, help="A JSON list of the label names.")
@click.option("--lora-rank", type=click.IntRange(min=0), default=0, show_default=True,
              help="Finetune LoRA adapters (on q and v) of this rank instead of every weight.")
@click.option("--lora-alpha", type=click.FloatRange(min=0, min_open=True), help="Default: the rank.")
@click.option("--epochs", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-4, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--context", type=click.IntRange(min=2), help="Tokens kept per text (its end). Default: the model's.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--dev-out", help="Write the dev predictions here, one label index per line.")
@click.option("--test-out", help="Write the test predictions here, one label index per line.")
@click.option("--device", type=click.Choice(backend.DEVICES), default="auto", show_default=True)
def classify_command(weights_path, mode, train_path, dev_path, test_path, label_names_path, lora_rank, lora_alpha,
                     epochs, lr, batch_size, context, seed, dev_out, test_out, device):
    """Classify texts with a Llama: zero-shot (label names scored as completions) or fine-tuned (a head on
    the last token's hidden state, training the whole model or LoRA adapters)."""
    _check_classify_flags(click.get_current_context(), mode, train_path, lora_rank)
    backend.use(device)
    names = classify.read_label_names(label_names_path)
    paths = {"train": train_path, "dev": dev_path, "test": test_path}
    examples = {split: classify.read_examples(path, names, labels_required=split != "test")
                for split, path in paths.items() if path}
    config, params, tokenizer = weights.load(weights_path)
    if tokenizer is None:
        raise click.ClickException(f"{weights_path} has no tokenizer to read the texts with")
    for split, rows in examples.items():
        classify.check_coverage(tokenizer, rows, paths[split])
    params = training.trainable(params)
    counts = np.bincount([label for label, _ in examples["dev"]], minlength=len(names))
    click.echo(f"dev: {len(examples['dev'])} examples, majority-class baseline {counts.max() / counts.sum():.3f}")
    window = min(context or config.max_position_embeddings, config.max_position_embeddings)
    if mode == "zero-shot":
        predict = {split: classify.zero_shot_scores(params, config, tokenizer, [text for _, text in rows], names,
                                                    batch_size, window).argmax(axis=1).tolist()
                   for split, rows in examples.items()}
    else:
        encoded = {split: [(label, classify.encode(tokenizer, text, window)) for label, text in rows]
                   for split, rows in examples.items()}
        tuned = classify.finetune(params, config, encoded["train"], encoded["dev"], len(names), epochs, lr, batch_size,
                                  lora_rank, lora_alpha, seed,
                                  on_epoch=lambda epoch, accuracy: click.echo(
                                      f"epoch {epoch}: dev accuracy {accuracy:.3f}"))
        click.echo(f"best epoch {tuned.best_epoch}")
        predict = {split: classify.predict(tuned.params, config, tuned.head, [ids for _, ids in rows], batch_size)
                   for split, rows in encoded.items() if split != "train"}
    for split, out in (("dev", dev_out), ("test", test_out)):
        if split in predict:
            _report_accuracy(split, predict[split], [label for label, _ in examples[split]], names)
            if out:
                classify.write_predictions(out, predict[split])


def _check_classify_flags(ctx, mode, train_path, lora_rank):
    if mode == "finetune" and not train_path:
        raise click.ClickException("--mode finetune needs --train examples")
    if mode == "zero-shot":
        finetune_only = ("train_path", "lora_rank", "lora_alpha", "epochs", "lr", "seed")
        given = [name for name in finetune_only if _given(ctx, name)]
        if given:
            raise click.ClickException(f"--{given[0].replace('_path', '').replace('_', '-')} is for --mode finetune")
    if _given(ctx, "lora_alpha") and not lora_rank:
        raise click.ClickException("--lora-alpha scales LoRA adapters: give --lora-rank too")


def _report_accuracy(split, predictions, labels, names):
    if any(label is None for label in labels):
        click.echo(f"{split}: {len(predictions)} predictions (unlabelled texts: no accuracy)")
        return
    click.echo(f"{split} accuracy {classify.accuracy_of(predictions, labels):.3f} ({len(labels)} examples)")
    if len(set(labels)) == 1 and len(labels) > 1:  # e.g. CFIMDB's test file: its labels are withheld
        click.echo(f"note: every {split} label is {names[labels[0]]!r}: placeholders? The accuracy is then "
                   f"the share of texts predicted {names[labels[0]]!r}", err=True)


@main.command("eval")
@click.option("--weights", "weights_path", required=True, help="A weights file or HF checkpoint directory.")
@click.option("--data", "data_path", required=True, help="A UTF-8 text file.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--device", type=click.Choice(backend.DEVICES), default="auto", show_default=True)
def eval_command(weights_path, data_path, batch_size, device):
    """Mean loss and perplexity of a model over a whole text file (with the model's tokenizer)."""
    backend.use(device)
    config, params, tokenizer = weights.load(weights_path)
    if tokenizer is None:
        raise click.ClickException(f"{weights_path} has no tokenizer to read the text with")
    text = data.read_text(data_path)
    data.check_coverage(tokenizer, text, f"the tokenizer of {weights_path}", data_path)
    ids = tokenizer.encode(text)
    if len(ids) < 2:
        raise click.ClickException(f"{data_path} holds {len(ids)} token(s): nothing to predict")
    mean, count = training.evaluate_ids(training.trainable(params), config, ids, batch_size)
    click.echo(f"loss {mean:.4f} nats/token, perplexity {math.exp(mean):.3f}, over {count:,} tokens")


if __name__ == "__main__":
    main()
