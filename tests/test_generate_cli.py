"""generate's and chat's flags: llama.cpp's sampling defaults with a printed seed that repeats the run, one
warning for the settings greedy decoding ignores, the repeat penalty, stop strings, prompts from a file
or stdin, several samples, the context shift past a short context, llama.cpp's short flags, and help
that states every default."""
import os
import re
import shlex
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from npllama import LlamaConfig, generation, init_params
from npllama.cli import main
from npllama.cli.generate import chat_command, generate_command
from npllama.io import weights
from tests.conftest import ROOT
from tests.test_chat import chat_model
from tests.test_generation import greedy_with_repeat_penalty

FIXTURES = os.path.join(ROOT, "tests", "fixtures", "import")
SEED = re.compile(r"; seed (\d+)")
PROMPT = "Once upon a time"


def cli(*args, input=None):
    return CliRunner().invoke(main, [str(arg) for arg in args], input=input)


def ok(result):
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def stderr_lines(result):
    return [line for line in result.stderr.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def story_file(tmp_path_factory):
    """The tiny random HF fixture (SentencePiece tokenizer, 384 ids) as an npllama weights file."""
    path = str(tmp_path_factory.mktemp("story") / "story.safetensors")
    weights.save(path, *weights.load(os.path.join(FIXTURES, "hf")))
    return path


def short_model(bos_token_id=None):
    """A random model with a context of 16 positions and no stop id; weights scaled up so that its
    greedy choices are clear."""
    config = LlamaConfig.from_dict(dict(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                                        bos_token_id=bos_token_id))
    params = init_params(config, seed=3, dtype="float64")
    return config, {name: value * 8 if value.ndim == 2 else value for name, value in params.items()}


@pytest.fixture(scope="module")
def short_file(tmp_path_factory):
    """short_model() (BOS id 1) saved without a tokenizer: generate prints ids."""
    path = str(tmp_path_factory.mktemp("short") / "short.safetensors")
    weights.save(path, *short_model(bos_token_id=1))
    return path


def ids_of(result):
    return [int(token) for token in result.stdout.split()]


# ---- defaults: sampling as llama.cpp does, with a seed that is said -------------------------------------
def test_generate_samples_by_default_and_says_the_seed_that_repeats_it(story_file):
    first = ok(cli("generate", "-m", story_file, "-p", PROMPT, "-n", 20))
    seed = int(SEED.search(first.stderr).group(1))
    again = ok(cli("generate", "-m", story_file, "-p", PROMPT, "-n", 20, "--seed", seed))
    assert again.stdout == first.stdout and f"; seed {seed}" in again.stderr
    llama_cpp = ok(cli("generate", "-m", story_file, "-p", PROMPT, "-n", 20, "--seed", seed, "--temperature", 0.8,
                       "--top-k", 40, "--top-p", 0.95, "--min-p", 0.05, "--repeat-penalty", 1, "--repeat-last-n", 64))
    assert llama_cpp.stdout == first.stdout  # the defaults are llama.cpp's
    greedy = ok(cli("generate", "-m", story_file, "-p", PROMPT, "-n", 20, "--temperature", 0))
    assert greedy.stdout != first.stdout and not SEED.search(greedy.stderr)
    other = ok(cli("generate", "-m", story_file, "-p", PROMPT, "-n", 20, "--seed", seed + 1))
    assert other.stdout != first.stdout


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory):
    """test_chat's random chat model (ChatML template), its logits left near uniform."""
    path = str(tmp_path_factory.mktemp("chat") / "chat.safetensors")
    weights.save(path, *chat_model(scale=1.0))
    return path


def test_chat_samples_by_default_and_says_the_seed(chat_file):
    first = ok(cli("chat", "-m", chat_file, "-n", 8, input="Hello\n"))
    seed = int(re.search(r"^sampling with seed (\d+)$", first.stderr, re.MULTILINE).group(1))
    again = ok(cli("chat", "-m", chat_file, "-n", 8, "-s", seed, input="Hello\n"))
    assert again.stdout == first.stdout
    greedy = ok(cli("chat", "-m", chat_file, "-n", 8, "--temperature", 0, input="Hello\n"))
    assert "seed" not in greedy.stderr and greedy.stdout != first.stdout


# ---- temperature 0 ----------------------------------------------------------------------------------------
def test_settings_greedy_decoding_ignores_draw_one_warning(story_file, chat_file):
    greedy = ok(cli("generate", "-m", story_file, "-p", PROMPT, "-n", 12, "--temperature", 0))
    result = ok(cli("generate", "-m", story_file, "-p", PROMPT, "-n", 12, "--temperature", 0, "--top-k", 5,
                    "--seed", 3, "--min-p", 0.2, "--top-p", 0.5))
    assert result.stdout == greedy.stdout
    warnings = [line for line in stderr_lines(result) if line.startswith("Warning:")]
    assert warnings == ["Warning: --top-k, --top-p, --min-p, --seed do nothing at temperature 0 (greedy "
                        "decoding picks the most likely token)"]
    assert stderr_lines(result)[-1].startswith("prompt ")  # the summary, as ever
    chat = ok(cli("chat", "-m", chat_file, "--temperature", 0, "-s", 1, input=""))
    assert stderr_lines(chat) == ["Warning: --seed does nothing at temperature 0 (greedy decoding picks the most "
                                  "likely token)"]


def test_the_repeat_penalty_acts_at_temperature_0_without_a_warning(short_file):
    args = ("generate", "-m", short_file, "--prompt-ids", "3 9 3", "-n", 12, "--temperature", 0)
    penalised = ok(cli(*args, "--repeat-penalty", 1.5, "--repeat-last-n", 5))
    assert not any(line.startswith("Warning:") for line in stderr_lines(penalised))
    config, params = short_model(bos_token_id=1)
    assert ids_of(penalised) == [3, 9, 3] + greedy_with_repeat_penalty(params, config, [3, 9, 3], 12, 1.5, 5)
    assert ids_of(penalised) != ids_of(ok(cli(*args)))  # the premise: the penalty changed something


# ---- stop strings -----------------------------------------------------------------------------------------
def a_string_across_two_tokens(texts):
    """Two consecutive new tokens' letters (texts[i]: the text after i new tokens) and where they begin,
    the first place the string is found after the prompt."""
    for i in range(len(texts) - 2):
        first, second = texts[i + 1][len(texts[i]):], texts[i + 2][len(texts[i + 1]):]
        if texts[i + 1].startswith(texts[i]) and texts[i + 2].startswith(texts[i + 1]) and \
                first.isalpha() and second.isalpha() and texts[-1].find(first + second, len(texts[0])) == len(texts[i]):
            return first + second, len(texts[i])
    raise AssertionError(f"no two consecutive tokens of letters in {texts[-1]!r}")


def test_a_stop_string_across_two_tokens_ends_the_text_and_is_not_printed(story_file):
    config, params, tokenizer = weights.load(story_file)
    ids = tokenizer.encode(PROMPT, bos=True)
    new = generation.generate(params, config, ids, 30, eos_ids=tokenizer.eos_ids)
    texts = [tokenizer.decode(ids + new[:i]) for i in range(len(new) + 1)]
    args = ("generate", "-m", story_file, "-p", PROMPT, "-n", 30, "--temperature", 0)
    assert ok(cli(*args)).stdout == texts[-1] + "\n"  # the premise: the same greedy tokens
    stop, at = a_string_across_two_tokens(texts)
    result = ok(cli(*args, "--stop", "never in this text", "--stop", stop))
    assert result.stdout == texts[-1][:at] + "\n"
    assert re.search(r"^prompt \d+ tokens, \d+ new \(stop\); ", result.stderr, re.MULTILINE)


def test_stop_needs_text(short_file):
    result = cli("generate", "-m", short_file, "--prompt-ids", "1 2", "--stop", "x")
    assert result.exit_code == 1 and stderr_lines(result) == [
        "Error: --stop looks for text: give --prompt or --prompt-file, not --prompt-ids"]
    empty = cli("generate", "-m", short_file, "-p", "Hello", "--stop", "")
    assert empty.exit_code == 1 and stderr_lines(empty) == ["Error: a stop string must not be empty"]
    assert empty.stdout == ""  # refused before the model was loaded and the prompt printed


# ---- prompts from a file or stdin -----------------------------------------------------------------------
def test_a_prompt_from_a_file_or_stdin_loses_one_final_newline(story_file, tmp_path):
    args = ("generate", "-m", story_file, "-n", 10, "--temperature", 0)
    expected = ok(cli(*args, "-p", PROMPT)).stdout
    (tmp_path / "prompt.txt").write_text(PROMPT + "\n", encoding="utf-8")
    assert ok(cli(*args, "--prompt-file", tmp_path / "prompt.txt")).stdout == expected
    assert ok(cli(*args, "-f", tmp_path / "prompt.txt")).stdout == expected
    assert ok(cli(*args, "--prompt", "-", input=PROMPT + "\n")).stdout == expected
    (tmp_path / "two.txt").write_text(PROMPT + "\n\n", encoding="utf-8")
    assert ok(cli(*args, "-f", tmp_path / "two.txt")).stdout == ok(cli(*args, "-p", PROMPT + "\n")).stdout


def test_bad_prompt_sources(story_file, tmp_path):
    missing = cli("generate", "-m", story_file, "-f", tmp_path / "missing.txt")
    assert missing.exit_code == 2 and "does not exist" in missing.stderr
    (tmp_path / "p.txt").write_text("x")
    both = cli("generate", "-m", story_file, "-p", "x", "-f", tmp_path / "p.txt")
    assert both.exit_code == 1 and stderr_lines(both) == [
        "Error: give exactly one of --prompt and --prompt-ids (a --prompt-file counts as --prompt)"]
    (tmp_path / "bad.txt").write_bytes(b"ab\xffc")
    bad = cli("generate", "-m", story_file, "-f", tmp_path / "bad.txt")
    assert bad.exit_code == 1
    assert stderr_lines(bad) == [f"Error: {tmp_path / 'bad.txt'} is not UTF-8 text: byte 0xff at offset 2"]
    no_stdin = subprocess.run(f"{shlex.quote(sys.executable)} cli.py generate -m {shlex.quote(story_file)} -p - <&-",
                              shell=True, cwd=ROOT, capture_output=True, text=True)
    assert no_stdin.returncode == 1 and no_stdin.stderr == \
        "Error: --prompt - reads the prompt from stdin, and this process has none\n"


# ---- several samples ----------------------------------------------------------------------------------------
def test_num_samples_gives_the_runs_of_seed_plus_i_reusing_the_prefill(story_file):
    args = ("generate", "-m", story_file, "-p", PROMPT, "-n", 8)
    result = ok(cli(*args, "--num-samples", 3, "--seed", 5))
    parts = re.split(r"^--- sample (\d) of 3 \(seed (\d+)\) ---\n", result.stdout, flags=re.MULTILINE)
    assert parts[0] == "" and parts[1::3] == ["1", "2", "3"] and parts[2::3] == ["5", "6", "7"]
    singles = [ok(cli(*args, "--seed", seed)).stdout for seed in (5, 6, 7)]
    assert parts[3::3] == singles and len(set(singles)) == 3
    summaries = [line for line in stderr_lines(result) if line.startswith("prompt ")]
    prompt_tokens = len(weights.load(story_file)[2].encode(PROMPT, bos=True))
    assert [SEED.search(line).group(1) for line in summaries] == ["5", "6", "7"]
    assert [f"({prompt_tokens} cached)" in line for line in summaries] == [False, True, True]


# ---- past the context ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("prompt, window", [("1 7 30", "the first token and the last 7"), ("5 7 30", "the last 8")])
def test_generate_goes_past_the_context_with_one_note(short_file, prompt, window):
    args = ("generate", "-m", short_file, "--prompt-ids", prompt, "-n", 40, "--temperature", 0)
    result = ok(cli(*args, "--num-samples", 2))
    assert len(result.stdout.split("\n--- sample 2 of 2 ---\n")[1].split()) == 3 + 40
    assert "Warning: --num-samples 2 at temperature 0 gives 2 identical continuations" in stderr_lines(result)
    notes = [line for line in stderr_lines(result) if line.startswith("Note:")]
    assert notes == [f"Note: the context (16 tokens) filled; continuing with a sliding window of {window} tokens "
                     "(--no-context-shift stops at the context instead)"]
    summaries = [line for line in stderr_lines(result) if line.startswith("prompt ")]
    assert len(summaries) == 2 and all(re.search(r"40 new \(length\);.*; \d context shifts re-ran \d+ tokens", line)
                                       for line in summaries)
    stopped = ok(cli(*args, "--no-context-shift"))
    assert len(ids_of(stopped)) == 3 + 16 - 3 + 1 and "Note:" not in stopped.stderr
    assert re.search(r"^prompt 3 tokens, 14 new \(context\); ", stopped.stderr, re.MULTILINE)
    assert ids_of(stopped) == ids_of(ok(cli(*args)))[:3 + 14]  # the same tokens up to the context


# ---- flags ----------------------------------------------------------------------------------------------------
def test_short_flags_are_llama_cpps(story_file, tmp_path):
    (tmp_path / "prompt.txt").write_text(PROMPT)
    long = ok(cli("generate", "--weights", story_file, "--prompt", PROMPT, "--max-new-tokens", 6, "--seed", 9))
    assert ok(cli("generate", "-m", story_file, "-p", PROMPT, "-n", 6, "-s", 9)).stdout == long.stdout
    assert ok(cli("generate", "-m", story_file, "-f", tmp_path / "prompt.txt", "-n", 6, "-s", 9)).stdout == long.stdout


@pytest.mark.parametrize("command", [generate_command, chat_command], ids=["generate", "chat"])
def test_every_flag_has_help_that_states_its_default(command):
    for option in command.params:
        assert option.help, option.name
        default = option.to_info_dict()["default"]
        assert option.show_default or option.required or default in (None, False), option.name
    paths = {option.name: option.type for option in command.params if isinstance(option.type, click.Path)}
    assert paths["weights_path"].exists and paths["weights_path"].dir_okay  # a run's or an HF directory
    assert paths["tokenizer_path"].exists and not paths["lora_path"].dir_okay
    if command is generate_command:
        assert paths["prompt_file"].exists and not paths["prompt_file"].dir_okay


def test_help_shows_the_defaults_and_the_short_flags():
    result = ok(CliRunner().invoke(main, ["generate", "--help"], terminal_width=200))
    for text in ("-m, --weights", "-p, --prompt", "-f, --prompt-file", "-n, --max-new-tokens", "-s, --seed",
                 "[default: 0.8;", "[default: 40;", "[default: 0.95;", "[default: 0.05;", "[default: 64;",
                 "[default: (random, printed on stderr)]", "--context-shift / --no-context-shift"):
        assert text in result.stdout, text
