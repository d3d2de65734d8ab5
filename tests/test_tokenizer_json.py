"""HF tokenizer.json tokenizers, the model's conventions (BOS, stop ids, chat template) read from an HF
directory, their GGUF metadata, and the weights file and HF export carrying them.

The reference ids are transformers' (tests/fixtures/make_tokenizer_fixtures.py wrote them into each
fixture directory's expected.json); for a SentencePiece tokenizer.model it is sentencepiece itself."""
import json
import os
import random
import warnings

import pytest
import sentencepiece

from npllama.io import tokenizer_gguf, weights
from npllama.io.common import TokenizerWarning, directory_tokenizer
from npllama.io.tokenizer import HFTokenizer, TokenizerError, from_metadata, load, to_metadata
from npllama.model import init_params
from npllama.config import LlamaConfig
from tests.conftest import ROOT

FIXTURES = os.path.join(ROOT, "tests", "fixtures", "tokenizers")
JSON_KINDS = ["llama3", "chatml", "spm_json"]
ALL_KINDS = JSON_KINDS + ["spm"]


def fixture(kind):
    directory = os.path.join(FIXTURES, kind)
    with open(os.path.join(directory, "expected.json"), encoding="utf-8") as file:
        return directory_tokenizer(directory), json.load(file)


def stream_decode(tokenizer, ids):
    stream = tokenizer.stream_decoder()
    return "".join(stream.push(i) for i in ids) + stream.flush()


@pytest.mark.parametrize("kind", JSON_KINDS)
def test_ids_and_text_equal_transformers(kind):
    tokenizer, expected = fixture(kind)
    for text, ids, decoded in zip(expected["texts"], expected["encode"], expected["decode"]):
        assert tokenizer.encode(text, bos=tokenizer.add_bos) == ids, text
        assert tokenizer.decode(ids) == decoded, text


def test_a_sentencepiece_model_encodes_as_sentencepiece_and_special_texts_as_transformers():
    """For a tokenizer.model the reference is sentencepiece (transformers' converted fast tokenizer
    drops a space from runs of leading spaces); sentencepiece cannot read '<s>' in text, so for texts
    with special tokens the reference is transformers."""
    tokenizer, expected = fixture("spm")
    reference = sentencepiece.SentencePieceProcessor(model_file=os.path.join(FIXTURES, "spm", "tokenizer.model"))
    for text, ids in zip(expected["texts"], expected["encode"]):
        if "<s>" in text or "</s>" in text:
            assert tokenizer.encode(text, bos=True) == ids, text
        else:
            assert tokenizer.encode(text, bos=True) == [1] + reference.encode(text), text
    assert tokenizer.encode("  two", bos=True) != expected["encode"][2][:3]  # the known difference is real


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_chat_template_renders_as_transformers(kind):
    tokenizer, expected = fixture(kind)
    for conversation, ids, text in zip(expected["conversations"], expected["chat"], expected["chat_text"]):
        assert tokenizer.apply_chat_template(conversation, tokenize=False) == text
        assert tokenizer.apply_chat_template(conversation) == ids


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_special_ids_and_conventions_come_from_the_directory(kind):
    tokenizer, expected = fixture(kind)
    assert (tokenizer.bos_id, tokenizer.eos_id) == (expected["bos_id"], expected["eos_id"])
    stops = {"llama3": {5, 1, 4}, "chatml": {2}, "spm_json": {2}, "spm": {2}}[kind]
    assert set(tokenizer.eos_ids) == stops and tokenizer.eos_ids[0] == tokenizer.eos_id
    assert tokenizer.add_bos == (kind != "chatml")  # the ChatML model adds none, as SmolLM
    assert tokenizer.chat_template is not None


@pytest.mark.parametrize("kind", JSON_KINDS)
def test_stream_decode_equals_one_shot_decode(kind):
    tokenizer, expected = fixture(kind)
    for ids in expected["encode"] + expected["chat"]:
        assert stream_decode(tokenizer, ids) == tokenizer.decode(ids)
    rng = random.Random(0)  # random ids split characters across tokens anywhere (byte pieces, emoji)
    for _ in range(200):
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randrange(1, 12))]
        assert stream_decode(tokenizer, ids) == tokenizer.decode(ids), ids


def test_stream_holds_a_character_until_its_last_byte():
    tokenizer, _ = fixture("llama3")
    ids = tokenizer.encode("🦙")
    assert len(ids) > 1  # the fixture's small vocabulary spells the emoji in several byte tokens
    stream = tokenizer.stream_decoder()
    assert [stream.push(i) for i in ids] == [""] * (len(ids) - 1) + ["🦙"]


def test_special_tokens_in_text_are_their_ids_and_decode_to_nothing():
    tokenizer, _ = fixture("llama3")
    eot = tokenizer.encode("<|eot_id|>")
    assert eot == [5]
    assert tokenizer.decode(tokenizer.encode("a<|eot_id|>b")) == "ab"


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_metadata_round_trip_keeps_the_conventions(kind):
    tokenizer, expected = fixture(kind)
    again = from_metadata(to_metadata(tokenizer))
    assert type(again) is type(tokenizer)
    assert again.conventions() == tokenizer.conventions()
    assert (again.bos_id, again.eos_id) == (tokenizer.bos_id, tokenizer.eos_id)
    for text in expected["texts"]:
        assert again.encode(text, bos=again.add_bos) == tokenizer.encode(text, bos=tokenizer.add_bos)


def test_metadata_of_an_older_file_has_the_default_conventions():
    llama = load(os.path.join(ROOT, "..", "shared", "data", "llama2-tokenizer.model"))
    old = json.loads(to_metadata(llama))
    for key in ("add_bos", "eos_ids", "chat_template"):
        del old[key]
    again = from_metadata(json.dumps(old))
    assert (again.add_bos, again.eos_ids, again.chat_template) == (True, (2,), None)


def test_metas_llama3_tokenizer_model_reads_as_byte_level_bpe_with_llama3s_stops():
    """Meta's directories have no generation_config.json: a rank file stops where Llama 3's chat does."""
    tokenizer = load(os.path.join(ROOT, "tests", "fixtures", "tiktoken", "llama3_like.tiktoken"))
    base = tokenizer.vocab_size - 256  # the 256 special tokens follow the ranks
    assert isinstance(tokenizer, HFTokenizer) and tokenizer.add_bos
    assert (tokenizer.bos_id, tokenizer.eos_ids) == (base, (base + 1, base + 8, base + 9))
    assert tokenizer.encode("hi", bos=True)[0] == base and tokenizer.token_text(base + 9) == "<|eot_id|>"


def test_unsupported_tokenizer_json_is_a_clear_error():
    with pytest.raises(TokenizerError, match="a WordPiece tokenizer.json is not supported"):
        load(os.path.join(FIXTURES, "wordpiece", "tokenizer.json"))


def test_a_file_that_is_not_a_tokenizer_json(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text('{"not": "a tokenizer"}')
    with pytest.raises(TokenizerError, match="is not a tokenizer.json"):
        load(path)


def test_a_directory_without_a_tokenizer_warns_in_one_line(tmp_path):
    with pytest.warns(TokenizerWarning, match="has no tokenizer"):
        assert directory_tokenizer(str(tmp_path)) is None


def test_a_directory_with_tokenizer_json_and_model_prefers_the_json(tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        (tmp_path / name).write_bytes(open(os.path.join(FIXTURES, "llama3", name), "rb").read())
    (tmp_path / "tokenizer.model").write_bytes(open(os.path.join(FIXTURES, "spm", "tokenizer.model"), "rb").read())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert isinstance(directory_tokenizer(str(tmp_path)), HFTokenizer)


# ---- GGUF metadata ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_gguf_metadata_round_trip(kind):
    """Written as llama.cpp's keys and read back: byte-level BPE stays byte-level ('gpt2', with the
    pre-tokenizer's llama.cpp name), SentencePiece and SentencePiece-style BPE become 'llama'."""
    tokenizer, expected = fixture(kind)
    fields = tokenizer_gguf.fields(tokenizer)
    assert fields["tokenizer.ggml.model"] == {"llama3": "gpt2", "chatml": "gpt2"}.get(kind, "llama")
    assert fields.get("tokenizer.ggml.pre") == {"llama3": "llama-bpe", "chatml": "gpt-2"}.get(kind)
    again = tokenizer_gguf.read(fields)
    assert (again.bos_id, again.eos_id, again.add_bos) == (tokenizer.bos_id, tokenizer.eos_id, tokenizer.add_bos)
    by_text = {i for i in range(tokenizer.vocab_size) if tokenizer.token_text(i) in tokenizer_gguf.END_OF_GENERATION}
    assert set(again.eos_ids) == set(tokenizer.eos_ids) | by_text  # llama.cpp stops on those too
    assert again.chat_template == tokenizer.chat_template
    for text, ids in zip(expected["texts"], expected["encode"]):
        if kind == "spm_json" and text.startswith(" "):
            continue  # as a SentencePiece model it follows sentencepiece on leading spaces (see above)
        if kind in ("spm", "spm_json") and "</s>" in text:
            continue  # after a special token llama.cpp's rule is not transformers' (the test below)
        assert again.encode(text, bos=again.add_bos) == tokenizer.encode(text, bos=tokenizer.add_bos), text
        assert again.decode(ids) == tokenizer.decode(ids)


def test_gguf_sentencepiece_text_after_a_special_token_begins_with_a_space_as_in_llama_cpp():
    """llama.cpp (llama-vocab.cpp, SPM) puts the dummy-prefix space before every text that follows a
    special token, as sentencepiece does to a text of its own and Meta's Llama 2 chat code does; HF's
    Llama tokenizer with legacy=False does not."""
    tokenizer, _ = fixture("spm")
    assert not tokenizer.legacy
    again = tokenizer_gguf.read(tokenizer_gguf.fields(tokenizer))
    reference = sentencepiece.SentencePieceProcessor(model_file=os.path.join(FIXTURES, "spm", "tokenizer.model"))
    text = "<s>[INST] Hi [/INST] Hello </s>"
    assert again.legacy and again.encode(text) == [1] + reference.encode("[INST] Hi [/INST] Hello ") + [2]
    assert tokenizer.encode(text)[1] != again.encode(text)[1] == reference.encode(" ")[0]


def test_gguf_llama_vocabulary_rebuilds_the_llama2_sentencepiece_model():
    llama = load(os.path.join(ROOT, "..", "shared", "data", "llama2-tokenizer.model"))
    fields = tokenizer_gguf.fields(llama)
    assert fields["tokenizer.ggml.tokens"][:4] == ["<unk>", "<s>", "</s>", "<0x00>"]
    assert fields["tokenizer.ggml.token_type"][:4] == [2, 3, 3, 6]
    assert fields["tokenizer.ggml.add_space_prefix"] is True
    again = tokenizer_gguf.read(fields)
    reference = sentencepiece.SentencePieceProcessor(model_file=os.path.join(ROOT, "..", "shared", "data",
                                                                             "llama2-tokenizer.model"))
    for text in ["Hello world", "  two spaces", "日本語 🦙 café", "tabs\tand\nnewlines", "x" * 50]:
        assert again.encode(text) == reference.encode(text)
        assert [reference.get_score(i) for i in again.encode(text)] == \
            [fields["tokenizer.ggml.scores"][i] for i in again.encode(text)]


def test_gguf_end_of_turn_ids_are_named_by_their_text():
    """eot_token_id and eom_token_id as llama.cpp knows them: by the token's text, not the stop set's order."""
    llama3 = load(os.path.join(ROOT, "tests", "fixtures", "tiktoken", "llama3_like.tiktoken"))
    fields = tokenizer_gguf.fields(llama3)
    assert llama3.token_text(fields["tokenizer.ggml.eot_token_id"]) == "<|eot_id|>"
    assert llama3.token_text(fields["tokenizer.ggml.eom_token_id"]) == "<|eom_id|>"
    tokenizer, _ = fixture("llama3")  # eos <|eot_id|>; <|end_of_text|> and <|eom_id|> stop too
    fields = tokenizer_gguf.fields(tokenizer)  # a stop of no known text is still written, as eot
    assert (fields["tokenizer.ggml.eot_token_id"], fields["tokenizer.ggml.eom_token_id"]) == (1, 4)
    assert set(tokenizer_gguf.read(fields).eos_ids) == set(tokenizer.eos_ids)


def test_gguf_refuses_what_it_cannot_express():
    from npllama.io.tokenizer import CharTokenizer
    with pytest.raises(TokenizerError, match="character vocabulary has no GGUF form"):
        tokenizer_gguf.fields(CharTokenizer("abc"))
    with pytest.raises(TokenizerError, match="GGUF tokenizer model 'bert' is not supported"):
        tokenizer_gguf.read({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]})
    with pytest.raises(TokenizerError, match="GGUF pre-tokenizer 'qwen2' is not supported"):
        tokenizer_gguf.read({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2",
                             "tokenizer.ggml.tokens": ["a"]})


# ---- the weights file and the HF export carry the tokenizer -----------------------------------------
def tiny_model(vocab_size):
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, tie_word_embeddings=True)
    return config, init_params(config, seed=0)


@pytest.mark.parametrize("kind", ["llama3", "spm"])
def test_weights_file_and_hf_export_keep_the_tokenizer(tmp_path, kind):
    tokenizer, expected = fixture(kind)
    config, params = tiny_model(tokenizer.vocab_size)
    weights.save(str(tmp_path / "m.safetensors"), config, params, tokenizer)
    _, _, loaded = weights.load(str(tmp_path / "m.safetensors"))
    assert loaded.conventions() == tokenizer.conventions()
    written = weights.export_hf(str(tmp_path / "hf"), config, params, loaded)
    assert {"tokenizer_config.json", "generation_config.json"} <= set(written)
    assert ("tokenizer.json" in written) == (kind == "llama3")
    _, _, exported = weights.load(str(tmp_path / "hf"))
    assert exported.conventions() == tokenizer.conventions()
    assert exported.apply_chat_template(expected["conversations"][1]) == expected["chat"][1]
    hf_config = json.load(open(tmp_path / "hf" / "config.json"))
    assert hf_config["bos_token_id"] == tokenizer.bos_id
    assert hf_config["eos_token_id"] == (list(tokenizer.eos_ids) if len(tokenizer.eos_ids) > 1 else tokenizer.eos_id)


@pytest.mark.parametrize("kind", JSON_KINDS)
def test_training_data_encodes_with_a_tokenizer_json_chunk_by_chunk(tmp_path, monkeypatch, kind):
    """train and eval read a text through data.token_ids, in chunks cut where nothing joins across the
    cut (a Llama 3 pre-tokenizer joins a newline to the spaces around it): the ids of one call; and any
    character is covered (bytes or byte fallback)."""
    from npllama import data
    tokenizer, _ = fixture(kind)
    calls = []
    encode = tokenizer.encode
    monkeypatch.setattr(tokenizer, "encode", lambda text, *a, **k: calls.append(len(text)) or encode(text, *a, **k))
    monkeypatch.setattr(data, "CHUNK_CHARS", 40)
    text = "First Citizen:\n  Speak, speak.\n\n\tAll: 🦙 日本\n \n   \nWe are <s> resolved.\n" * 30 + "end"
    data.check_coverage(tokenizer, text)
    ids = data.token_ids(text, tokenizer, str(tmp_path))
    assert max(calls) < len(text) / 4  # in pieces ...
    assert list(ids) == encode(text, special=False)  # ... that add up to the one-call ids


# ---- SentencePiece conventions and what transformers' Llama class does ---------------------------------
def test_text_after_a_special_token_keeps_every_character():
    """legacy=False encodes the text after a special token without the dummy prefix, by the same model
    with add_dummy_prefix off: nothing is merged across the boundary or dropped."""
    tokenizer, _ = fixture("spm")
    for text in [">> quoted", ">", "> x", "<un", " two", "a", "日本", "\n", "<<SYS>>"]:
        ids = tokenizer.encode("</s>" + text)
        assert ids[0] == 2 and tokenizer.decode(tokenizer.encode("a") + ids[1:]) == "a" + text, text  # read mid-text


def test_unk_text_is_the_unknown_id_and_special_false_reads_specials_as_text():
    tokenizer, _ = fixture("spm")
    assert tokenizer.encode("<unk>a")[0] == tokenizer.unk_id == 0
    plain = tokenizer.encode("use <s>struck</s> text", special=False)
    assert 1 not in plain and 2 not in plain and tokenizer.decode(plain) == "use <s>struck</s> text"
    llama3, _ = fixture("llama3")
    assert 5 not in llama3.encode("a<|eot_id|>b", special=False)
    assert llama3.decode(llama3.encode("a<|eot_id|>b", special=False)) == "a<|eot_id|>b"
    assert llama3.encode("a<|eot_id|>b") == llama3.encode("a") + [5] + llama3.encode("b")


def test_a_legacy_layout_llama_tokenizer_json_runs_as_transformers_llama_class(tmp_path):
    """transformers 5's LlamaTokenizer keeps only the BPE of a tokenizer.json and pre-tokenizes with its
    own Metaspace (no '▁' after a special token unless legacy): a file laid out the older way (a
    normalizer prepending '▁', as TinyLlama's) must give the same ids as the fixture transformers wrote."""
    source = os.path.join(FIXTURES, "spm_json")
    document = json.load(open(os.path.join(source, "tokenizer.json"), encoding="utf-8"))
    document["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}
    document["pre_tokenizer"] = None
    json.dump(document, open(tmp_path / "tokenizer.json", "w", encoding="utf-8"), ensure_ascii=False)
    (tmp_path / "tokenizer_config.json").write_bytes(open(os.path.join(source, "tokenizer_config.json"), "rb").read())
    tokenizer = directory_tokenizer(str(tmp_path))
    _, expected = fixture("spm_json")
    for text, ids in zip(expected["texts"], expected["encode"]):
        assert tokenizer.encode(text, bos=True) == ids, text


def test_a_broken_llama_class_tokenizer_json_is_one_clear_error(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"model": ')  # cut short
    (tmp_path / "tokenizer_config.json").write_text('{"tokenizer_class": "LlamaTokenizer"}')
    with pytest.raises(TokenizerError, match="is not a tokenizer.json"):
        directory_tokenizer(str(tmp_path))


def test_user_defined_pieces_split_the_text_as_llama_cpp_does():
    """A SentencePiece model's user-defined pieces are matched in the text first (as llama.cpp and HF's
    added tokens are), and with legacy the text after one begins with the dummy-prefix space."""
    import io as bytes_io
    model = bytes_io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(["one line", "another line", "and a <ud> piece"] * 30), model_writer=model,
        model_type="bpe", vocab_size=300, byte_fallback=True, user_defined_symbols=["<ud>"], minloglevel=2)
    from npllama.io.tokenizer import SentencePieceTokenizer
    tokenizer = SentencePieceTokenizer(model.getvalue())
    reference = sentencepiece.SentencePieceProcessor(model_proto=model.getvalue())
    ud = reference.piece_to_id("<ud>")
    assert tokenizer.encode("a<ud>b") == reference.encode("a") + [ud] + reference.encode("b")


def test_special_tokens_map_names_bos_and_eos_when_the_config_does_not(tmp_path):
    source = os.path.join(FIXTURES, "chatml")
    (tmp_path / "tokenizer.json").write_bytes(open(os.path.join(source, "tokenizer.json"), "rb").read())
    config = json.load(open(os.path.join(source, "tokenizer_config.json")))
    special = {"bos_token": config.pop("bos_token"), "eos_token": {"content": config.pop("eos_token")}}
    json.dump(config, open(tmp_path / "tokenizer_config.json", "w"))
    json.dump(special, open(tmp_path / "special_tokens_map.json", "w"))
    tokenizer = directory_tokenizer(str(tmp_path))
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.eos_ids) == (1, 2, (2,))


def test_a_tokenizer_file_given_by_path_brings_its_directorys_conventions(tmp_path):
    """--tokenizer DIR/tokenizer.json: the BOS, stops and chat template of DIR's config files come too."""
    expected = directory_tokenizer(os.path.join(FIXTURES, "llama3"))
    config, params = tiny_model(expected.vocab_size)
    weights.save(str(tmp_path / "bare.safetensors"), config, params)
    _, _, tokenizer = weights.load(str(tmp_path / "bare.safetensors"),
                                   os.path.join(FIXTURES, "llama3", "tokenizer.json"))
    assert tokenizer.conventions() == expected.conventions() and tokenizer.chat_template is not None
    assert (tokenizer.bos_id, tokenizer.eos_id, len(tokenizer.eos_ids)) == (expected.bos_id, expected.eos_id, 3)
