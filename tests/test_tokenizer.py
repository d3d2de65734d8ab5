import json
import os
import random

import pytest
import sentencepiece

from npllama.io.tokenizer import (CharTokenizer, SentencePieceTokenizer, TokenizerError, from_metadata,
                               load, to_metadata)
from tests.conftest import ROOT

LLAMA_TOKENIZER = os.path.join(ROOT, "..", "shared", "data", "llama2-tokenizer.model")
BYTE_BASE = 3  # Llama's byte pieces <0x00>..<0xFF> are ids 3..258

# Every one of these survives encode -> decode with the Llama tokenizer: its normalizer is the identity
# (no NFKC: the ligature, full-width letter and no-break space stay as they are) and it keeps runs of
# whitespace, so even leading, trailing and repeated spaces come back.
ROUND_TRIP_TEXTS = [
    "Hello world",
    "café naïve résumé",
    "日本語のテキスト",
    "emoji 🦙🎉 and ⅸ ① ㎏",
    "line one\nline two\n\n",
    "tab\there\r\n",
    "a  b   c",
    "  two leading spaces",
    " one leading space",
    "trailing  ",
    " ",
    "",
    "ﬁ ligature, ＡＢＣ full width, no\u00a0break",
    "e\u0301 (a combining accent)",
    "\U0010FFFF",
]


@pytest.fixture(scope="module")
def llama():
    return load(LLAMA_TOKENIZER)


@pytest.fixture(scope="module")
def reference():
    """sentencepiece itself, the oracle for what decode must return."""
    return sentencepiece.SentencePieceProcessor(model_file=LLAMA_TOKENIZER)


def stream_decode(tokenizer, ids):
    stream = tokenizer.stream_decoder()
    return "".join(stream.push(i) for i in ids) + stream.flush()


def test_llama_tokenizer_sizes_and_special_ids(llama):
    assert (llama.vocab_size, llama.bos_id, llama.eos_id) == (32000, 1, 2)
    assert llama.kind == "sentencepiece"
    assert llama.describe() == "SentencePiece, 32000 pieces"
    with open(LLAMA_TOKENIZER, "rb") as file:
        assert llama.model_bytes == file.read()


def test_encode_adds_bos_and_eos_on_request(llama, reference):
    plain = llama.encode("Hello world")
    assert plain == reference.encode("Hello world")
    assert llama.encode("Hello world", bos=True) == [1] + plain
    assert llama.encode("Hello world", bos=True, eos=True) == [1] + plain + [2]


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_round_trip(llama, text):
    assert llama.decode(llama.encode(text)) == text
    assert llama.decode(llama.encode(text, bos=True, eos=True)) == text


def test_characters_outside_the_vocabulary_become_byte_pieces(llama, reference):
    ids = llama.encode("🦙")
    assert [reference.id_to_piece(i) for i in ids] == ["▁", "<0xF0>", "<0x9F>", "<0xA6>", "<0x99>"]


@pytest.mark.parametrize("text, decoded", [("▁x", " x"), ("a▁b", "a b"), ("x ▁", "x  ")])
def test_the_space_marker_in_text_comes_back_as_a_space(llama, reference, text, decoded):
    # '▁' (U+2581) is how pieces spell a space, so a literal one in the text is read as a space: the one
    # string a Llama round trip changes, by design.
    ids = llama.encode(text)
    assert llama.decode(ids) == reference.decode(ids) == decoded


def test_decode_skips_control_ids_as_sentencepiece_does(llama, reference):
    hello = llama.encode("Hello")
    ids = [1] + hello + [2, 1] + hello + [2]
    assert llama.decode(ids) == reference.decode(ids) == "Hello Hello"


def test_decode_rejects_ids_outside_the_vocabulary(llama):
    with pytest.raises(TokenizerError, match=r"token id 32000 is outside the vocabulary \(0\.\.31999\)"):
        llama.decode([1, 32000])
    with pytest.raises(TokenizerError, match="token id -1"):
        llama.stream_decoder().push(-1)


# ---- streaming decode ---------------------------------------------------------------------------------
@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS + ["▁x", "a▁b"])
@pytest.mark.parametrize("bos, eos", [(False, False), (True, False), (True, True)])
def test_stream_matches_one_shot_decode(llama, text, bos, eos):
    ids = llama.encode(text, bos=bos, eos=eos)
    assert stream_decode(llama, ids) == llama.decode(ids)


def test_stream_never_prints_a_character_it_must_take_back(llama):
    ids = llama.encode("ⅸ €🦙 日本 \U0010FFFF", bos=True)
    final = llama.decode(ids)
    stream, printed = llama.stream_decoder(), ""
    for i in ids:
        printed += stream.push(i)
        assert final.startswith(printed)


def test_stream_prints_a_byte_character_as_soon_as_it_is_complete(llama):
    euro_bytes = [BYTE_BASE + b for b in "€".encode()]
    stream = llama.stream_decoder()
    assert [stream.push(i) for i in llama.encode("a") + euro_bytes] == ["a", "", "", "€"]
    assert stream.flush() == ""


def test_stream_flush_prints_bytes_that_never_formed_a_character(llama, reference):
    ids = llama.encode("a") + [BYTE_BASE + 0xE2, BYTE_BASE + 0x82]
    stream = llama.stream_decoder()
    assert "".join(stream.push(i) for i in ids) == "a"
    assert stream.flush() == "\ufffd\ufffd" == reference.decode(ids)[1:]


def test_stream_keeps_the_space_of_a_piece_after_a_mid_text_bos(llama):
    hello = llama.encode("Hello")
    ids = [1, 29871] + hello + [1] + hello  # 29871 is '▁': sentencepiece drops only the first space
    assert stream_decode(llama, ids) == llama.decode(ids) == " Hello Hello"


def random_ids(rng, length):
    """Ids drawn to stress the decoder: byte pieces (often lead or continuation bytes, mostly not
    valid UTF-8), BOS/EOS/unknown, lone and double '▁', newlines and ordinary pieces."""
    leads = [0xC2, 0xDF, 0xE2, 0xED, 0xEF, 0xF0, 0xF4, 0xC0, 0xF8, 0xFF]
    specials = [0, 1, 2, 29871, 259, 13]
    draws = [lambda: BYTE_BASE + rng.randrange(256),
             lambda: BYTE_BASE + rng.randrange(0x80, 0xC0),
             lambda: BYTE_BASE + rng.choice(leads),
             lambda: rng.choice(specials),
             lambda: rng.randrange(32000)]
    return [rng.choice(draws)() for _ in range(length)]


def test_stream_matches_one_shot_decode_on_random_ids(llama):
    rng = random.Random(0)
    for _ in range(1500):
        ids = random_ids(rng, rng.randint(0, 12))
        assert stream_decode(llama, ids) == llama.decode(ids), ids


@pytest.mark.parametrize("kind", ["random", "invalid bytes", "continuation bytes", "control ids", "text"])
def test_stream_window_stays_short(llama, kind):
    rng = random.Random(1)
    ids = {"random": random_ids(rng, 5000),
           "invalid bytes": [BYTE_BASE + 0xFF] * 5000,
           "continuation bytes": [BYTE_BASE + 0x80] * 5000,
           "control ids": [1, 2] * 2500 + llama.encode("Hello"),
           "text": llama.encode("Once upon a time 🦙 " * 500)}[kind]
    stream, printed, longest = llama.stream_decoder(), [], 0
    for i in ids:
        printed.append(stream.push(i))
        longest = max(longest, len(stream._window))
    assert longest <= 4  # a lead byte and three continuation bytes at most
    assert "".join(printed) + stream.flush() == llama.decode(ids)


# ---- character tokenizer ------------------------------------------------------------------------------
def test_char_tokenizer_round_trip_in_the_given_order():
    tokenizer = CharTokenizer("ba\n é")
    assert tokenizer.encode("abé\n") == [1, 0, 4, 2]
    assert tokenizer.decode([1, 0, 4, 2]) == "abé\n"
    assert (tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id) == (5, None, None)
    assert (tokenizer.kind, tokenizer.describe()) == ("char", "characters, 5 symbols")
    assert CharTokenizer(["b", "a"]).encode("ab") == [1, 0]


def test_char_tokenizer_from_text_sorts_the_characters():
    with open(os.path.join(ROOT, "..", "shared", "data", "tinyshakespeare.txt")) as file:
        text = file.read()
    tokenizer = CharTokenizer.from_text(text)
    assert tokenizer.vocab_size == 65  # nanoGPT's shakespeare_char
    assert tokenizer.chars == "".join(sorted(set(text)))
    assert tokenizer.decode(tokenizer.encode(text[:2000])) == text[:2000]


def test_char_tokenizer_names_the_first_unknown_character_and_its_offset():
    tokenizer = CharTokenizer("abc")
    with pytest.raises(TokenizerError, match=r"^character '\\n' at offset 2 is not in the 3-character"):
        tokenizer.encode("ab\ncé")
    with pytest.raises(TokenizerError, match=r"character 'é' at offset 1 "):
        tokenizer.encode("aéb\n")


def test_char_tokenizer_has_no_bos_or_eos():
    with pytest.raises(TokenizerError, match="has no BOS token"):
        CharTokenizer("ab").encode("ab", bos=True)
    with pytest.raises(TokenizerError, match="has no EOS token"):
        CharTokenizer("ab").encode("ab", eos=True)


@pytest.mark.parametrize("chars, message", [("aba", "'a' appears twice"), ("", "at least one"),
                                            (["a", "bc"], "single characters, got 'bc'")])
def test_char_tokenizer_rejects_a_bad_vocabulary(chars, message):
    with pytest.raises(TokenizerError, match=message):
        CharTokenizer(chars)


def test_char_stream_prints_each_character_at_once():
    tokenizer = CharTokenizer("abc\n")
    stream = tokenizer.stream_decoder()
    assert [stream.push(i) for i in [0, 3, 2]] == ["a", "\n", "c"]
    assert stream.flush() == ""
    with pytest.raises(TokenizerError, match="token id 4 is outside"):
        stream.push(4)


# ---- embedding in metadata, loading -------------------------------------------------------------------
def test_metadata_round_trip_of_a_sentencepiece_tokenizer(llama):
    text = to_metadata(llama)
    assert json.loads(text)["type"] == "sentencepiece"
    restored = from_metadata(text)
    assert restored.model_bytes == llama.model_bytes
    assert restored.encode(ROUND_TRIP_TEXTS[3], bos=True) == llama.encode(ROUND_TRIP_TEXTS[3], bos=True)


def test_metadata_round_trip_of_a_char_tokenizer():
    tokenizer = CharTokenizer("zy\n\"é🦙")
    text = to_metadata(tokenizer)
    assert json.loads(text) == {"type": "char", "chars": "zy\n\"é🦙"}
    restored = from_metadata(text)
    assert restored.kind == "char"
    assert restored.encode("🦙\"z\n") == tokenizer.encode("🦙\"z\n") == [5, 3, 0, 2]


@pytest.mark.parametrize("text, message", [
    ("{not json", "not valid JSON"),
    ('{"type": "bpe"}', "must be"),
    ('{"type": "char"}', "must be"),
    ('["char"]', "must be"),
    ('{"type": "sentencepiece", "model": "%%%"}', "not valid base64"),
    ('{"type": "sentencepiece", "model": "aGVsbG8gd29ybGQ="}', "embedded tokenizer is not a SentencePiece"),
    ('{"type": "sentencepiece", "model": ""}', "not a SentencePiece model: it is empty"),
])
def test_corrupt_metadata_is_a_tokenizer_error(text, message):
    with pytest.raises(TokenizerError, match=message):
        from_metadata(text)


def test_a_file_that_is_not_a_sentencepiece_model(tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_text("just some text\n")
    with pytest.raises(TokenizerError, match=f"^{path} is not a SentencePiece model: "):
        load(path)
    with pytest.raises(TokenizerError, match="cannot read tokenizer .*missing.model: No such file"):
        SentencePieceTokenizer.from_file(tmp_path / "missing.model")
