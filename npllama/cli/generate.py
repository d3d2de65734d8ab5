"""The generate command: continue a prompt, streaming text (or token ids) as it is produced."""
import sys

import click

from .. import adapters, backend, generation
from ..io import weights
from .common import device_option


def _parse_ids(text):
    try:
        return [int(part) for part in text.replace(",", " ").split()]
    except ValueError:
        raise click.ClickException(f"--prompt-ids must be integers separated by spaces or commas, got {text!r}") \
            from None


@click.command(name="generate")
@click.option("--weights", "weights_path", required=True, help="An npllama weights file or HF checkpoint directory.")
@click.option("--prompt", help="Text to continue (needs a tokenizer in the weights).")
@click.option("--prompt-ids", help="Token ids to continue, e.g. '1 450 4996', for weights without a tokenizer.")
@click.option("-n", "--max-new-tokens", type=click.IntRange(min=0), default=256, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="0 picks the most likely token (greedy).")
@click.option("--top-k", type=click.IntRange(min=1), help="Sample among the k most likely tokens.")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), help="Sample within this probability mass.")
@click.option("--seed", type=int, help="Seed for sampling (same seed, same text).")
@device_option
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
        lora, info = weights.load_adapters(lora_path, config)
        params = adapters.attach(params, lora, info["alpha"] / info["rank"])
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


COMMANDS = [generate_command]
