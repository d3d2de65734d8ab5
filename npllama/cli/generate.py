"""The generate and chat commands: continue a prompt, or converse, streaming text as it is produced."""
import sys

import click

from .. import adapters, backend, conversation, generation
from ..errors import UserError
from ..io import weights
from .common import device_option


def _parse_ids(text):
    try:
        return [int(part) for part in text.replace(",", " ").split()]
    except ValueError:
        raise click.ClickException(f"--prompt-ids must be integers separated by spaces or commas, got {text!r}") \
            from None


def _model_options(function):
    """The flags generate and chat share: the model, sampling and the device."""
    for option in reversed([
            click.option("--weights", "weights_path", required=True,
                         help="An npllama weights file, HF or Meta checkpoint directory, GGUF or llama2.c file."),
            click.option("--temperature", type=click.FloatRange(min=0), default=0.0, show_default=True,
                         help="0 picks the most likely token (greedy)."),
            click.option("--top-k", type=click.IntRange(min=1), help="Sample among the k most likely tokens."),
            click.option("--top-p", type=click.FloatRange(0, 1, min_open=True),
                         help="Sample within this probability mass."),
            click.option("--seed", type=int, help="Seed for sampling (same seed, same text)."),
            device_option,
            click.option("--dtype", type=click.Choice(["auto", "fp32", "fp16"]), default="auto", show_default=True,
                         help="Compute dtype; auto: fp32 on the CPU, fp16 weights stay fp16 on a GPU."),
            click.option("--tokenizer", "tokenizer_path",
                         help="A tokenizer file (SentencePiece .model, tokenizer.json) instead of the model's."),
            click.option("--lora", "lora_path", help="LoRA adapters (a run's adapters.safetensors) to apply, unmerged.")]):
        function = option(function)
    return function


def _load(weights_path, device, tokenizer_path, lora_path):
    backend.use(device)
    config, params, tokenizer = weights.load(weights_path, tokenizer_path)
    if lora_path:
        lora, info = weights.load_adapters(lora_path, config)
        params = adapters.attach(params, lora, info["alpha"] / info["rank"])
    return config, params, tokenizer


@click.command(name="generate")
@click.option("--prompt", help="Text to continue (needs a tokenizer in the weights).")
@click.option("--prompt-ids", help="Token ids to continue, e.g. '1 450 4996', for weights without a tokenizer.")
@click.option("--chat", "as_chat", is_flag=True,
              help="Render --prompt as one user message with the model's chat template; print only the reply.")
@click.option("-n", "--max-new-tokens", type=click.IntRange(min=0), default=256, show_default=True)
@_model_options
def generate_command(weights_path, prompt, prompt_ids, as_chat, max_new_tokens, temperature, top_k, top_p, seed,
                     device, dtype, tokenizer_path, lora_path):
    """Continue a prompt, streaming text to stdout; a summary line goes to stderr."""
    if (prompt is None) == (prompt_ids is None):
        raise click.ClickException("give exactly one of --prompt and --prompt-ids")
    if as_chat and prompt is None:
        raise click.ClickException("--chat renders a --prompt text as a user message")
    config, params, tokenizer = _load(weights_path, device, tokenizer_path, lora_path)
    if prompt is not None and tokenizer is None:
        raise click.ClickException(f"{weights_path} has no tokenizer: pass --tokenizer PATH, "
                                   "or give token ids with --prompt-ids")
    if as_chat:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    else:
        ids = _parse_ids(prompt_ids) if prompt_ids is not None else tokenizer.encode(prompt, bos=tokenizer.add_bos)
    eos_ids = tokenizer.eos_ids if tokenizer is not None else config.to_dict().get("eos_token_id")
    tokens, stats = generation.stream(params, config, ids, max_new_tokens, temperature, top_k, top_p, seed,
                                      eos_ids=eos_ids, dtype=None if dtype == "auto" else dtype,
                                      vocab_limit=tokenizer.vocab_size if tokenizer is not None else None)
    if prompt_ids is not None or tokenizer is None:
        _print_ids(ids, tokens)
    else:
        _print_text(tokenizer, [] if as_chat else ids, tokens)
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


@click.command(name="chat")
@click.option("--system", help="A system message that opens the conversation (else the template's own default).")
@click.option("-n", "--max-new-tokens", type=click.IntRange(min=1), default=512, show_default=True,
              help="The longest reply, in tokens.")
@click.option("--context", type=click.IntRange(min=1), default=conversation.DEFAULT_CONTEXT, show_default=True,
              help="Positions the conversation may fill (at most the model's context).")
@_model_options
def chat_command(weights_path, system, max_new_tokens, context, temperature, top_k, top_p, seed, device, dtype,
                 tokenizer_path, lora_path):
    """Talk with a chat model: one message per line on stdin, replies streamed to stdout.

    /reset starts the conversation again, /exit (or end of input) ends it; Ctrl-C stops a reply and
    keeps the conversation. Piped stdin works too: one message per line, one reply per message; a
    message that cannot be answered (the context is full) ends it with an error."""
    config, params, tokenizer = _load(weights_path, device, tokenizer_path, lora_path)
    session = conversation.ChatSession(params, config, tokenizer, system, context, temperature, top_k, top_p,
                                       seed, None if dtype == "auto" else dtype)
    interactive = sys.stdin.isatty()
    if hasattr(sys.stdin, "reconfigure"):  # a byte that is not UTF-8 is then the tokenizer's to refuse
        sys.stdin.reconfigure(errors="surrogateescape")
    if interactive:
        click.echo(f"chatting with {weights_path} ({session.context} positions); /reset, /exit, Ctrl-C stops a "
                   "reply", err=True)
    for line in _messages(interactive):
        if line == "/exit":
            break
        if line == "/reset":
            session.reset()
            click.echo("(conversation reset)", err=True)
        elif line.strip():
            _reply(session, line, max_new_tokens, interactive)


def _messages(interactive):
    """The user's lines, without their line ends, until the end of input (or Ctrl-C at the prompt)."""
    while True:
        try:
            line = input("> ") if interactive else sys.stdin.readline()
        except (EOFError, KeyboardInterrupt):
            return
        if not interactive and not line:
            return
        yield line.rstrip("\r\n")


def _reply(session, text, max_new_tokens, interactive):
    try:
        pieces, stats = session.reply(text, max_new_tokens)
    except UserError as error:  # the context is full, the text is not UTF-8, the template fails ...
        if not interactive:
            raise  # a script's later messages would answer a conversation that is not the one it wrote
        click.echo(f"Error: {error}", err=True)
        return
    try:
        for piece in pieces:
            click.echo(piece, nl=False)
            sys.stdout.flush()
    except KeyboardInterrupt:
        pieces.close()  # keeps what was said so far
        stats.stop_reason = "interrupted"
    click.echo()
    if stats.stop_reason == "context":
        click.echo(f"(the context of {session.context} positions is full: /reset to start again)", err=True)
    if interactive or stats.stop_reason != "eos":
        click.echo(stats.summary(), err=True)


COMMANDS = [generate_command, chat_command]
