"""Chat: templates rendered in a sandbox, a session whose kept KV cache is exact, the chat command over
piped stdin, generate --chat, and a Llama-3.2-shaped model end to end."""
import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

from npllama import ChatSession, chat, generation
from npllama.cli import main
from npllama.config import LlamaConfig
from npllama.conversation import ChatError
from npllama.io import chat_template, weights
from npllama.io.common import directory_tokenizer
from npllama.model import init_params
from tests.conftest import ROOT

FIXTURES = os.path.join(ROOT, "tests", "fixtures", "tokenizers")
HELLO = [{"role": "user", "content": "Hello"}]


def cli(*args, input=None):
    return CliRunner().invoke(main, [str(arg) for arg in args], input=input)


def assert_one_clear_line(result, fragment):
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:") and fragment in lines[0], result.stderr


# ---- templates ------------------------------------------------------------------------------------------
def test_render_offers_what_transformers_templates_use():
    template = ("{{ bos_token }}{% for m in messages %}{{ m['role'] | upper }}: {{ m['content'] | tojson }}\n"
                "{% endfor %}{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
                "{% endfor %}{{ ns.n }} {{ dict(a=1)['a'] }} {{ strftime_now('%Y') | length }}"
                "{% if add_generation_prompt %}>{% endif %}")
    text = chat_template.render(template, [{"role": "user", "content": "café \"q\""}], True, bos_token="<s>")
    assert text == '<s>USER: "café \\"q\\""\n1 1 4>'


def test_a_template_that_raises_gives_its_message():
    with pytest.raises(chat_template.ChatTemplateError, match="the chat template failed: roles must alternate"):
        chat_template.render("{{ raise_exception('roles must alternate') }}", HELLO)


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__ }}",                         # Python internals through an attribute
    "{{ messages.append(1) }}",                           # changing the caller's data
    "{% set ns = namespace(_x=1) %}",                     # an underscore attribute on a namespace
    "{{ cycler.__init__.__globals__ }}",
])
def test_the_sandbox_refuses(template):
    with pytest.raises(chat_template.ChatTemplateError, match="the chat template failed"):
        chat_template.render(template, HELLO)


@pytest.mark.parametrize("template", ["{{ ''.__class__ }}", "{{ dict.__call__ }}", "{{ messages.__len__ }}"])
def test_an_unsafe_attribute_renders_as_nothing(template):
    """As in transformers (jinja2's sandbox): an attribute the sandbox forbids reads as undefined."""
    assert chat_template.render(template, HELLO) == ""


def test_invalid_jinja_and_bad_messages_are_clear_errors():
    with pytest.raises(chat_template.ChatTemplateError, match="not valid Jinja"):
        chat_template.render("{% for %}", HELLO)
    with pytest.raises(chat_template.ChatTemplateError, match="a chat message is a dict with a 'role'"):
        chat_template.render("x", [{"content": "no role"}])


# ---- a session ------------------------------------------------------------------------------------------
def chat_model(kind="chatml", scale=10.0):
    """A random float64 model for a fixture tokenizer; weights scaled up so its greedy choices are clear."""
    tokenizer = directory_tokenizer(os.path.join(FIXTURES, kind))
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True)
    params = {name: value if value.ndim == 1 else value * scale
              for name, value in init_params(config, seed=3, dtype="float64").items()}
    return config, params, tokenizer


def common_prefix(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@pytest.mark.parametrize("kind", ["chatml", "llama3", "spm"])
def test_a_kept_cache_gives_the_tokens_of_generating_from_scratch(kind):
    config, params, tokenizer = chat_model(kind)
    session = ChatSession(params, config, tokenizer)
    ran = []
    advance = session.decoder.advance
    session.decoder.advance = lambda ids: ran.append(len(ids)) or advance(ids)
    first_prompt = tokenizer.apply_chat_template(HELLO)
    pieces, _ = session.reply("Hello", 6)
    first = "".join(pieces)
    fed = list(session.cached)
    ran.clear()
    pieces, stats = session.reply("And then?", 6)
    second = "".join(pieces)

    conversation = HELLO + [{"role": "assistant", "content": first}, {"role": "user", "content": "And then?"}]
    assert session.messages == conversation + [{"role": "assistant", "content": second}]
    ids = tokenizer.apply_chat_template(conversation)
    new = generation.generate(params, config, ids, 6, eos_ids=tokenizer.eos_ids)
    assert second == tokenizer.decode([t for t in new if t not in tokenizer.eos_ids])
    shared = common_prefix(ids, fed)  # (a random model's reply need not come back as the same tokens)
    assert shared >= len(first_prompt)  # at least the first turn's prompt was kept ...
    assert ran[0] == len(ids) - shared  # ... and only the rest was run
    assert (stats.prompt_tokens, stats.cached_tokens, stats.new_tokens) == (len(ids), shared, len(new))


@pytest.mark.parametrize("kind", ["chatml", "llama3", "spm"])
def test_a_reply_the_template_writes_back_alike_is_not_run_again(kind):
    """When the reply comes back in the next render as the tokens it was generated as (a real model's
    usually do), the second turn runs only the ids after it: the end of turn and the new message."""
    config, params, tokenizer = chat_model(kind)
    first = tokenizer.apply_chat_template(HELLO)
    later = HELLO + [{"role": "assistant", "content": "Hello there, friend."}, {"role": "user", "content": "More"}]
    full = tokenizer.apply_chat_template(later)
    assert full[:len(first)] == first
    end = next(i for i in range(len(first), len(full)) if full[i] in tokenizer.eos_ids)
    script = iter(full[len(first):end + 1])  # the reply as the template writes it, then its end of turn
    session = ChatSession(params, config, tokenizer)
    session.sampler = lambda logits, previous: next(script)
    assert "".join(session.reply("Hello", 20)[0]).strip() == "Hello there, friend."  # (Llama 2 pads it)
    ran = []
    advance = session.decoder.advance
    session.decoder.advance = lambda ids: ran.append(len(ids)) or advance(ids)
    session.sampler = lambda logits, previous: tokenizer.eos_ids[0]
    pieces, stats = session.reply("More", 20)
    "".join(pieces)
    assert ran == [len(full) - end] and stats.cached_tokens == end


def test_chat_function_replies_to_a_conversation():
    config, params, tokenizer = chat_model()
    ids = tokenizer.apply_chat_template(HELLO)
    new = generation.generate(params, config, ids, 5, eos_ids=tokenizer.eos_ids)
    assert chat(params, config, tokenizer, HELLO, max_new_tokens=5) == \
        tokenizer.decode([t for t in new if t not in tokenizer.eos_ids])
    with pytest.raises(ChatError, match="ends with a message whose role is 'user'"):
        chat(params, config, tokenizer, [{"role": "assistant", "content": "hi"}])


def test_a_reply_stops_at_the_end_of_turn_token():
    config, params, tokenizer = chat_model()
    ids = tokenizer.apply_chat_template(HELLO)
    free = generation.generate(params, config, ids, 3)
    eot = free[1]  # pretend the second token ends the turn
    tokenizer.eos_ids = (eot,)
    session = ChatSession(params, config, tokenizer)
    pieces, stats = session.reply("Hello", 10)
    assert "".join(pieces) == tokenizer.decode(free[:1]) and stats.stop_reason == "eos"


def test_a_full_context_is_said_and_reset_starts_again():
    config, params, tokenizer = chat_model()
    session = ChatSession(params, config, tokenizer, context=60)
    pieces, stats = session.reply("Hello", 100)
    "".join(pieces)
    assert stats.stop_reason == "context" and len(session.cached) == 60
    with pytest.raises(ChatError, match="no longer fits the context of 60 tokens: /reset"):
        session.reply("more " * 10)
    session.reset()
    assert session.messages == [] and session.cached == []


def test_stopping_a_reply_early_keeps_what_was_said():
    config, params, tokenizer = chat_model()
    session = ChatSession(params, config, tokenizer)
    pieces, _ = session.reply("Hello", 10)
    next(pieces), next(pieces)
    pieces.close()  # what Ctrl-C does
    two = generation.generate(params, config, tokenizer.apply_chat_template(HELLO), 2)
    assert session.messages == HELLO + [{"role": "assistant", "content": tokenizer.decode(two)}]


def test_a_model_without_a_template_cannot_chat():
    config, params, tokenizer = chat_model()
    tokenizer.chat_template = None
    with pytest.raises(ChatError, match="no chat template"):
        ChatSession(params, config, tokenizer)


# ---- the commands ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chat_file(tmp_path_factory):
    config, params, tokenizer = chat_model()
    path = str(tmp_path_factory.mktemp("chat") / "chat.safetensors")
    weights.save(path, config, params, tokenizer)
    return path


def test_chat_over_piped_stdin_equals_generating_each_turn(chat_file):
    config, params, tokenizer = weights.load(chat_file)
    result = cli("chat", "--weights", chat_file, "-n", "6", "--temperature", "0", "--system", "Be brief.",
                 input="Hello\nAnd then?\n")
    assert result.exit_code == 0, result.output
    conversation = [{"role": "system", "content": "Be brief."}]
    expected = ""
    for message in ("Hello", "And then?"):
        conversation.append({"role": "user", "content": message})
        new = generation.generate(params, config, tokenizer.apply_chat_template(conversation), 6,
                                  eos_ids=tokenizer.eos_ids)
        reply = tokenizer.decode([t for t in new if t not in tokenizer.eos_ids])
        conversation.append({"role": "assistant", "content": reply})
        expected += reply + "\n"
    assert result.stdout == expected


def test_chat_reset_and_exit(chat_file):
    once = cli("chat", "--weights", chat_file, "-n", "4", "--temperature", "0", input="Hello\n")
    again = cli("chat", "--weights", chat_file, "-n", "4", "--temperature", "0",
                input="Hi\n/reset\nHello\n/exit\nnever read\n")
    assert once.exit_code == 0 and again.exit_code == 0
    assert again.stdout.endswith(once.stdout) and again.stdout.count("\n") == 2
    assert "(conversation reset)" in again.stderr


def test_generate_chat_renders_one_user_message(chat_file):
    config, params, tokenizer = weights.load(chat_file)
    result = cli("generate", "--weights", chat_file, "--chat", "--prompt", "Hello", "-n", "5", "--temperature", "0")
    assert result.exit_code == 0, result.output
    new = generation.generate(params, config, tokenizer.apply_chat_template(HELLO), 5, eos_ids=tokenizer.eos_ids)
    assert result.stdout == tokenizer.decode(new) + "\n"


def test_chat_without_a_template_is_one_clear_line(tmp_path):
    config, params, tokenizer = chat_model()
    tokenizer.chat_template = None
    path = str(tmp_path / "base.safetensors")
    weights.save(path, config, params, tokenizer)
    assert_one_clear_line(cli("chat", "--weights", path, input="Hello\n"), "no chat template")
    assert_one_clear_line(cli("generate", "--weights", path, "--chat", "--prompt", "Hi"), "no chat template")


def test_a_template_that_fails_is_one_clear_line(tmp_path):
    config, params, tokenizer = chat_model()
    tokenizer.chat_template = "{{ ''.__class__.__mro__ }}"
    path = str(tmp_path / "bad.safetensors")
    weights.save(path, config, params, tokenizer)
    assert_one_clear_line(cli("generate", "--weights", path, "--chat", "--prompt", "Hi"), "the chat template failed")


# ---- a Llama-3.2-shaped model ---------------------------------------------------------------------------
LLAMA32 = dict(vocab_size=128256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=131072,
               tie_word_embeddings=True, rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                                       "high_freq_factor": 4.0,
                                                       "original_max_position_embeddings": 8192})


def llama32_directory(directory):
    """An HF directory shaped as Llama-3.2-1B-Instruct's: 128,256 ids (the fixture's byte-level BPE padded
    with reserved tokens up to 128,000, then its special tokens at Llama 3's ids), tied embeddings,
    llama3 RoPE scaling, GQA, a 131,072-position context, its stop ids and a Llama-3-style template."""
    source = os.path.join(FIXTURES, "llama3")
    document = json.load(open(os.path.join(source, "tokenizer.json"), encoding="utf-8"))
    specials = {token["content"]: token["id"] for token in document["added_tokens"]}
    llama3_ids = {"<|begin_of_text|>": 128000, "<|end_of_text|>": 128001, "<|start_header_id|>": 128006,
                  "<|end_header_id|>": 128007, "<|eom_id|>": 128008, "<|eot_id|>": 128009}
    vocab = {token: i for token, i in document["model"]["vocab"].items() if token not in specials}
    renumber = {old: new for new, old in enumerate(sorted(vocab.values()))}
    vocab = {token: renumber[i] for token, i in vocab.items()}
    vocab.update((f"<|reserved_{i}|>", i) for i in range(len(vocab), 128000))
    taken = set(llama3_ids.values())
    free = iter(i for i in range(128000, 128256) if i not in taken)
    added = [{"id": llama3_ids[token], "content": token, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for token in llama3_ids]
    added += [{"id": i, "content": f"<|reserved_special_token_{i}|>", "single_word": False, "lstrip": False,
               "rstrip": False, "normalized": False, "special": True} for i in free]
    document.update(added_tokens=added)
    document["model"]["vocab"] = {**vocab, **{token["content"]: token["id"] for token in added}}
    bos = document["post_processor"]["special_tokens"]["<|begin_of_text|>"]
    bos["ids"] = [128000]
    config = LlamaConfig(**LLAMA32)
    weights.export_hf(directory, config, init_params(config, seed=1, dtype="float16"))
    with open(os.path.join(directory, "tokenizer.json"), "w", encoding="utf-8") as file:
        json.dump(document, file, ensure_ascii=False)
    for name in ("tokenizer_config.json",):
        with open(os.path.join(source, name), encoding="utf-8") as file:
            open(os.path.join(directory, name), "w").write(file.read())
    json.dump({"bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009]},
              open(os.path.join(directory, "generation_config.json"), "w"))
    hf_config = json.load(open(os.path.join(directory, "config.json")))
    hf_config.update(bos_token_id=128000, eos_token_id=[128001, 128008, 128009])
    json.dump(hf_config, open(os.path.join(directory, "config.json"), "w"))


def test_a_llama32_shaped_model_imports_generates_and_chats(tmp_path):
    directory = str(tmp_path / "llama32")
    llama32_directory(directory)
    out = str(tmp_path / "llama32.safetensors")
    result = cli("load-weights", directory, "--out", out)
    assert result.exit_code == 0, result.output
    assert "byte-level BPE (tokenizer.json), 128256 tokens" in result.stdout
    config, params, tokenizer = weights.load(out)
    assert config.rope_scaling["rope_type"] == "llama3" and config.num_key_value_heads == 2
    assert (tokenizer.bos_id, set(tokenizer.eos_ids)) == (128000, {128001, 128008, 128009})
    assert tokenizer.encode("Hello", bos=tokenizer.add_bos)[0] == 128000
    assert tokenizer.apply_chat_template(HELLO)[:2] == [128000, 128006]

    generated = cli("generate", "--weights", out, "--prompt", "Hello", "-n", "4", "--temperature", "0.7", "--seed", "1")
    assert generated.exit_code == 0 and generated.stdout.startswith("Hello"), generated.output
    chatted = cli("chat", "--weights", out, "-n", "4", "--temperature", "0", input="Hello\nAgain\n")
    assert chatted.exit_code == 0, chatted.output
    params = {name: np.asarray(value, np.float32) for name, value in params.items()}
    conversation = HELLO
    new = generation.generate(params, config, tokenizer.apply_chat_template(conversation), 4,
                              eos_ids=tokenizer.eos_ids)
    assert chatted.stdout.startswith(tokenizer.decode(new) + "\n")


def test_generation_blocks_and_messages_without_content_render_as_in_transformers():
    template = ("{% for m in messages %}{{ m['role'] }}:{% if m.content %}{{ m.content }}{% endif %}"
                "{% if m.tool_calls %}{{ m.tool_calls | tojson }}{% endif %}"
                "{% if m.role == 'assistant' %}{% generation %}!{% endgeneration %}{% endif %}{{ '\n' }}{% endfor %}")
    messages = HELLO + [{"role": "assistant", "tool_calls": [{"name": "f"}]}]
    assert chat_template.render(template, messages, False) == 'user:Hello\nassistant:[{"name": "f"}]!\n'


def test_a_template_error_is_said_once():
    with pytest.raises(chat_template.ChatTemplateError) as error:
        chat_template.render("{% for %}", HELLO)
    assert str(error.value).count("chat template") == 1


def test_a_prompt_that_is_not_text_is_one_clear_line(chat_file):
    assert_one_clear_line(cli("generate", "--weights", chat_file, "--prompt", "ab\udcffc"),
                          "the text is not valid UTF-8: '\\udcff' at offset 2")


def test_piped_chat_stops_at_a_message_it_cannot_answer(chat_file):
    result = cli("chat", "--weights", chat_file, "--context", "60", "-n", "2",
                 input="Hello\n" + "word " * 40 + "\nnever answered\n")
    assert result.exit_code == 1 and result.stdout.count("\n") == 1
    assert result.stderr.strip().splitlines()[-1].startswith("Error: the message makes a prompt of ")


def test_stopped_while_its_prompt_runs_a_turn_is_not_had():
    config, params, tokenizer = chat_model()
    session = ChatSession(params, config, tokenizer)
    advance = session.decoder.advance

    def interrupted(ids):
        raise KeyboardInterrupt
    session.decoder.advance = interrupted
    pieces, _ = session.reply("Hello", 4)
    with pytest.raises(KeyboardInterrupt):
        next(pieces)
    assert session.messages == [] and session.cached == []
    session.decoder.advance = advance
    pieces, _ = session.reply("Hello", 4)
    reply = "".join(pieces)
    new = generation.generate(params, config, tokenizer.apply_chat_template(HELLO), 4, eos_ids=tokenizer.eos_ids)
    assert reply == tokenizer.decode([t for t in new if t not in tokenizer.eos_ids])
