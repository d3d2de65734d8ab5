#!/usr/bin/env python3
"""npllama's command line: parses flags, calls the library, prints. No math lives here."""
import os
import sys

import click

from npllama import backend, generation, tokenizer as tokenizers, weights
from npllama.config import PRESETS, ConfigError, LlamaConfig, human_count
from npllama.safetensors_file import SafetensorsError

# Errors that mean bad input: printed as one line ("Error: ..."), exit status 1, no traceback.
USER_ERRORS = (weights.WeightsError, generation.GenerationError, tokenizers.TokenizerError,
               backend.BackendError, ConfigError, SafetensorsError)


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
    click.echo(weights.describe(*weights.load(weights_path), path=None if os.path.isdir(weights_path) else weights_path))


@main.command("export-hf")
@click.argument("weights_path", metavar="WEIGHTS")
@click.argument("outdir")
@click.option("--force", is_flag=True, help="Write into OUTDIR even if it is not empty.")
def export_hf(weights_path, outdir, force):
    """Write WEIGHTS as an HF transformers directory (config.json, model.safetensors, tokenizer.model)."""
    if os.path.isdir(outdir) and os.listdir(outdir) and not force:
        raise click.ClickException(f"{outdir} is not empty; pass --force to write into it")
    config, params, tokenizer = weights.load(weights_path)
    weights.export_hf(outdir, config, params, tokenizer)
    click.echo(f"wrote {outdir} (config.json, model.safetensors"
               f"{', tokenizer.model' if isinstance(tokenizer, tokenizers.SentencePieceTokenizer) else ''})")


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
def generate_command(weights_path, prompt, prompt_ids, max_new_tokens, temperature, top_k, top_p, seed, device,
                     dtype, tokenizer_path):
    """Continue a prompt, streaming text to stdout; a summary line goes to stderr."""
    if (prompt is None) == (prompt_ids is None):
        raise click.ClickException("give exactly one of --prompt and --prompt-ids")
    backend.use(device)
    config, params, tokenizer = weights.load(weights_path, tokenizer_path)
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


if __name__ == "__main__":
    main()
