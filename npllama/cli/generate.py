"""The generate and chat commands: continue a prompt, or converse, streaming text as it is produced."""
import sys
import warnings

import click

from .. import adapters, backend, conversation, data, generation
from ..errors import Notice, UserError
from ..io import weights
from ..sampling import DEFAULTS, GREEDY_IGNORES
from .common import device_option, given


def _parse_ids(text):
    try:
        return [int(part) for part in text.replace(",", " ").split()]
    except ValueError:
        raise click.ClickException(f"--prompt-ids must be integers separated by spaces or commas, got {text!r}") \
            from None


def _model_options(function):
    """The flags generate and chat share: the model, sampling and the device."""
    for option in reversed([
            click.option("-m", "--weights", "weights_path", required=True, type=click.Path(exists=True),
                         help="An npllama weights file, a training run's directory, an HF or Meta checkpoint "
                              "directory, a GGUF or llama2.c file."),
            click.option("--temperature", type=click.FloatRange(min=0), default=DEFAULTS["temperature"],
                         show_default=True, help="Divides the logits before sampling; 0 picks the most likely "
                                                 "token (greedy)."),
            click.option("--top-k", type=click.IntRange(min=0), default=DEFAULTS["top_k"], show_default=True,
                         help="Sample among the k most likely tokens (a count of tokens; 0: all)."),
            click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=DEFAULTS["top_p"],
                         show_default=True, help="Sample among the most likely tokens that together reach this "
                                                 "probability (a fraction; 1: all)."),
            click.option("--min-p", type=click.FloatRange(0, 1), default=DEFAULTS["min_p"], show_default=True,
                         help="Drop tokens less likely than this fraction of the most likely one (0: none)."),
            click.option("--repeat-penalty", type=click.FloatRange(min=0, min_open=True),
                         default=DEFAULTS["repeat_penalty"], show_default=True,
                         help="Divide the positive logits (multiply the negative ones) of tokens seen in the last "
                              "--repeat-last-n tokens, the prompt's included, by this factor (1: off)."),
            click.option("--repeat-last-n", type=click.IntRange(min=0), default=DEFAULTS["repeat_last_n"],
                         show_default=True, help="How many of the latest tokens the repeat penalty looks at "
                                                 "(a count of tokens; 0: off)."),
            click.option("-s", "--seed", type=int, show_default="random, printed on stderr",
                         help="Seed for sampling (an integer >= 0): the same seed and settings give the same text."),
            device_option,
            click.option("--dtype", type=click.Choice(["auto", "fp32", "fp16"]), default="auto", show_default=True,
                         help="Compute dtype; auto: fp32 on the CPU, fp16 weights stay fp16 on a GPU."),
            click.option("--tokenizer", "tokenizer_path", type=click.Path(exists=True, dir_okay=False),
                         show_default="the one in the weights",
                         help="A tokenizer file (SentencePiece .model, tokenizer.json) instead of the model's."),
            click.option("--lora", "lora_path", type=click.Path(exists=True, dir_okay=False),
                         show_default="none",
                         help="LoRA adapters (a run's adapters.safetensors) to apply, unmerged.")]):
        function = option(function)
    return function


def _load(weights_path, device, tokenizer_path, lora_path):
    backend.use(device)
    config, params, tokenizer = weights.load(weights_path, tokenizer_path)
    if lora_path:
        lora, info = weights.load_adapters(lora_path, config, base_params=params)
        params = adapters.attach(params, lora, info["alpha"] / info["rank"])
    return config, params, tokenizer


def _sampling(temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed):
    """The sampler's settings, after a warning when the user gave some that greedy decoding ignores."""
    ignored = [name for name in GREEDY_IGNORES if given(click.get_current_context(), name)]
    if temperature == 0 and ignored:
        flags = ", ".join("--" + name.replace("_", "-") for name in ignored)
        warnings.warn(f"{flags} do{'es' * (len(ignored) == 1)} nothing at temperature 0 (greedy decoding "
                      "picks the most likely token)", Notice)
    return dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty,
                repeat_last_n=repeat_last_n, seed=seed)


def _prompt_text(prompt, prompt_file):
    """--prompt's text, or that of stdin (--prompt -) or of --prompt-file, less one final newline (as
    llama.cpp's -f reads a file: editors and echo end one with a newline)."""
    if prompt_file is None and prompt != "-":
        return prompt
    if prompt_file is None:
        if sys.stdin is None:
            raise click.ClickException("--prompt - reads the prompt from stdin, and this process has none")
        text = data.decode_text(click.get_binary_stream("stdin").read(), "the prompt on stdin")
    else:
        with open(prompt_file, "rb") as file:
            text = data.decode_text(file.read(), prompt_file)
    return text[:-1] if text.endswith("\n") else text


@click.command(name="generate")
@click.option("-p", "--prompt", help="Text to continue (needs a tokenizer in the weights); - reads it from stdin.")
@click.option("-f", "--prompt-file", type=click.Path(exists=True, dir_okay=False),
              help="A UTF-8 file whose text to continue (less one final newline), instead of --prompt.")
@click.option("--prompt-ids", help="Token ids to continue, e.g. '1 450 4996', for weights without a tokenizer.")
@click.option("--chat", "as_chat", is_flag=True,
              help="Render the prompt as one user message with the model's chat template; print only the reply.")
@click.option("-n", "--max-new-tokens", type=click.IntRange(min=0), default=256, show_default=True,
              help="The most tokens to generate (a count of tokens).")
@click.option("--stop", "stop_strings", multiple=True, show_default="none",
              help="Stop once the generated text contains this string, which is not printed (repeatable).")
@click.option("--num-samples", type=click.IntRange(min=1), default=1, show_default=True,
              help="Continuations of the prompt to generate, the i-th (from 0) with seed + i.")
@click.option("--context-shift/--no-context-shift", default=True, show_default=True,
              help="When the model's context is full, go on from a sliding window of the latest half of it "
                   "(re-run from position 0), or stop there.")
@_model_options
def generate_command(weights_path, prompt, prompt_file, prompt_ids, as_chat, max_new_tokens, stop_strings,
                     num_samples, context_shift, temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n,
                     seed, device, dtype, tokenizer_path, lora_path):
    """Continue a prompt, streaming text to stdout; a summary line goes to stderr."""
    if [prompt, prompt_file, prompt_ids].count(None) != 2:
        raise click.ClickException("give exactly one of --prompt and --prompt-ids (a --prompt-file counts as "
                                   "--prompt)")
    if as_chat and prompt_ids is not None:
        raise click.ClickException("--chat renders a --prompt text as a user message")
    if stop_strings and prompt_ids is not None:
        raise click.ClickException("--stop looks for text: give --prompt or --prompt-file, not --prompt-ids")
    generation.StopStrings(stop_strings)  # refuses an empty one before the model is loaded
    sampling = _sampling(temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed)
    if num_samples > 1 and temperature == 0:
        warnings.warn(f"--num-samples {num_samples} at temperature 0 gives {num_samples} identical continuations",
                      Notice)
    text = _prompt_text(prompt, prompt_file) if prompt_ids is None else None
    config, params, tokenizer = _load(weights_path, device, tokenizer_path, lora_path)
    if text is not None and tokenizer is None:
        raise click.ClickException(f"{weights_path} has no tokenizer: pass --tokenizer PATH, "
                                   "or give token ids with --prompt-ids")
    if as_chat:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    else:
        ids = _parse_ids(prompt_ids) if text is None else tokenizer.encode(text, bos=tokenizer.add_bos)
    bos_id = tokenizer.bos_id if tokenizer is not None else config.to_dict().get("bos_token_id")
    starts_with_bos = bool(ids) and ids[0] == bos_id  # kept through context shifts, as llama.cpp keeps it
    eos_ids = tokenizer.eos_ids if tokenizer is not None else config.to_dict().get("eos_token_id")
    runs = generation.samples(params, config, ids, max_new_tokens, eos_ids=eos_ids,
                              dtype=None if dtype == "auto" else dtype,
                              vocab_limit=tokenizer.vocab_size if tokenizer is not None else None,
                              context_shift=context_shift, keep_first=int(starts_with_bos),
                              num_samples=num_samples, **sampling)
    noted = False
    for index, (tokens, stats) in enumerate(runs):
        if num_samples > 1:
            seed_note = f" (seed {stats.seed})" if stats.seed is not None else ""
            click.echo(f"--- sample {index + 1} of {num_samples}{seed_note} ---")
        if text is None:
            _print_ids(ids, tokens)
        else:
            _print_text(tokenizer, [] if as_chat else ids, tokens, stats, stop_strings)
        if stats.context_shifts and not noted:
            click.echo(_shift_note(config.max_position_embeddings, stats, starts_with_bos), err=True)
            noted = True
        click.echo(stats.summary() + f"; {backend.describe()}", err=True)


def _shift_note(context, stats, kept_bos):
    window = (f"the first token and the last {stats.shift_window - 1}" if kept_bos
              else f"the last {stats.shift_window}")
    return (f"Note: the context ({context} tokens) filled; continuing with a sliding window of {window} tokens "
            "(--no-context-shift stops at the context instead)")


def _print_text(tokenizer, prompt_ids, tokens, stats, stop_strings):
    """The prompt, then each new token's text as soon as it is complete (exactly decode(all ids)), up to
    a stop string."""
    decoder = tokenizer.stream_decoder()
    click.echo("".join(decoder.push(token) for token in prompt_ids), nl=False)
    for piece in generation.stream_text(tokens, stats, decoder, stop_strings):
        click.echo(piece, nl=False)
        sys.stdout.flush()
    click.echo()


def _print_ids(prompt_ids, tokens):
    click.echo(" ".join(map(str, prompt_ids)), nl=False)
    for token in tokens:
        click.echo(f" {token}", nl=False)
        sys.stdout.flush()
    click.echo()


@click.command(name="chat")
@click.option("--system", show_default="the template's own",
              help="A system message that opens the conversation.")
@click.option("-n", "--max-new-tokens", type=click.IntRange(min=1), default=512, show_default=True,
              help="The longest reply (a count of tokens).")
@click.option("--context", type=click.IntRange(min=1), default=conversation.DEFAULT_CONTEXT, show_default=True,
              help="Positions the conversation may fill (a count of tokens, at most the model's context); when "
                   "full, /reset starts again.")
@_model_options
def chat_command(weights_path, system, max_new_tokens, context, temperature, top_k, top_p, min_p, repeat_penalty,
                 repeat_last_n, seed, device, dtype, tokenizer_path, lora_path):
    """Talk with a chat model: one message per line on stdin, replies streamed to stdout.

    /reset starts the conversation again, /exit (or end of input) ends it; Ctrl-C stops a reply and
    keeps the conversation. Piped stdin works too: one message per line, one reply per message; a
    message that cannot be answered (the context is full) ends it with an error."""
    sampling = _sampling(temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed)
    config, params, tokenizer = _load(weights_path, device, tokenizer_path, lora_path)
    session = conversation.ChatSession(params, config, tokenizer, system, context,
                                       dtype=None if dtype == "auto" else dtype, **sampling)
    interactive = sys.stdin.isatty()
    if hasattr(sys.stdin, "reconfigure"):  # a byte that is not UTF-8 is then the tokenizer's to refuse
        sys.stdin.reconfigure(errors="surrogateescape")
    seed_note = f", seed {session.sampler.seed}" if temperature > 0 else ""
    if interactive:
        click.echo(f"chatting with {weights_path} ({session.context} positions{seed_note}); /reset, /exit, "
                   "Ctrl-C stops a reply", err=True)
    elif seed_note:
        click.echo(f"sampling with seed {session.sampler.seed}", err=True)
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
