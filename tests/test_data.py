"""The data pipeline (npllama/data.py): reading text, tokenizers, the token cache, splits and batches."""
import io
import os
import re

import numpy as np
import pytest
import sentencepiece

from npllama import data
from npllama.cli import flag
from npllama.data import DataError
from npllama.io.tokenizer import CharTokenizer, SentencePieceTokenizer
from tests.conftest import ROOT

SHARED = os.path.join(ROOT, "..", "shared", "data")
LLAMA_TOKENIZER = os.path.join(SHARED, "llama2-tokenizer.model")
TINY_SHAKESPEARE = os.path.join(SHARED, "tinyshakespeare.txt")


@pytest.fixture(scope="module")
def corpus():
    return data.builtin_text()


@pytest.fixture(scope="module")
def bpe300(corpus, tmp_path_factory):
    return data.make_tokenizer("bpe:300", corpus, tmp_path_factory.mktemp("bpe"))


@pytest.fixture(scope="module")
def bpe512(corpus, tmp_path_factory):
    return data.make_tokenizer("bpe:512", corpus, tmp_path_factory.mktemp("bpe"))


class CountingTokenizer:
    """A tokenizer that counts its encode calls (and otherwise is the one it wraps)."""

    def __init__(self, inner):
        self._inner = inner
        self.encode_calls = 0

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def encode(self, text, bos=False, eos=False, special=True):
        self.encode_calls += 1
        return self._inner.encode(text, bos, eos, special)


def train_sentencepiece(lines, **options):
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model,
                                             minloglevel=2, **options)
    return SentencePieceTokenizer(model.getvalue())


# ---- read_text ------------------------------------------------------------------------------------------
def test_read_text_keeps_the_text_exact(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes("one\r\ntwo\rthree\n café 🦙\n".encode())
    assert data.read_text(path) == "one\r\ntwo\rthree\n café 🦙\n"


def test_read_text_missing_file(tmp_path):
    path = tmp_path / "nothing.txt"
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}: no such file$"):
        data.read_text(path)


def test_read_text_directory(tmp_path):
    with pytest.raises(DataError, match="is a directory"):
        data.read_text(tmp_path)


@pytest.mark.parametrize("content, what", [(b"", "is empty"), (b" \n\t\r\n ", "only whitespace")])
def test_read_text_empty(tmp_path, content, what):
    path = tmp_path / "e.txt"
    path.write_bytes(content)
    with pytest.raises(DataError, match=f"^{re.escape(str(path))} .*{what}"):
        data.read_text(path)


@pytest.mark.parametrize("content, byte, offset", [
    (b"hello \xff world", 0xFF, 6),
    ("héllo wörld ".encode() + b"\xc3\x28", 0xC3, 14),     # a lead byte followed by no continuation
    (b"x" * 1234 + b"\x80abc", 0x80, 1234),              # a continuation byte with no lead
])
def test_read_text_not_utf8_names_the_offset(tmp_path, content, byte, offset):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(DataError) as error:
        data.read_text(path)
    assert str(error.value) == f"{path} is not UTF-8 text: byte 0x{byte:02x} at offset {offset}"


def test_read_text_truncated_character_at_the_end(tmp_path):
    path = tmp_path / "cut.txt"
    path.write_bytes(b"price: " + "€".encode()[:2])
    with pytest.raises(DataError, match=r"byte 0xe2 at offset 7 \(the file ends inside a character\)$"):
        data.read_text(path)


# ---- the built-in corpus --------------------------------------------------------------------------------
def test_builtin_corpus_ships_in_the_package(corpus):
    package = os.path.dirname(os.path.abspath(data.__file__))
    assert os.path.commonpath([package, data.BUILTIN_CORPUS]) == package
    raw = open(data.BUILTIN_CORPUS, "rb").read()
    assert 50_000 <= len(raw) <= 200_000
    assert raw.decode("utf-8") == corpus
    assert corpus.endswith("\n") and corpus.startswith("First Citizen:")
    assert os.path.isfile(os.path.join(package, "corpus", "README.md"))


@pytest.mark.skipif(not os.path.isfile(TINY_SHAKESPEARE), reason="no ../shared/data/tinyshakespeare.txt")
def test_builtin_corpus_is_the_start_of_tiny_shakespeare(corpus):
    with open(TINY_SHAKESPEARE, encoding="utf-8", newline="") as file:
        assert file.read().startswith(corpus)


# ---- tokenizers -----------------------------------------------------------------------------------------
def test_char_tokenizer_is_the_sorted_characters_of_the_text(corpus, tmp_path):
    tokenizer = data.make_tokenizer("char", corpus, tmp_path)
    assert isinstance(tokenizer, CharTokenizer)
    assert tokenizer.chars == "".join(sorted(set(corpus)))
    assert tokenizer.decode(tokenizer.encode(corpus)) == corpus


def test_bpe_trains_a_byte_fallback_model(bpe300, corpus):
    assert isinstance(bpe300, SentencePieceTokenizer)
    assert (bpe300.vocab_size, bpe300.bos_id, bpe300.eos_id) == (300, 1, 2)
    sp = sentencepiece.SentencePieceProcessor(model_proto=bpe300.model_bytes)
    assert sp.unk_id() == 0 and sp.pad_id() == -1
    assert [sp.id_to_piece(i) for i in (3, 258)] == ["<0x00>", "<0xFF>"]
    ids = bpe300.encode(corpus)
    assert len(ids) < len(corpus)                  # some merges, not just characters
    assert bpe300.decode(ids) == corpus
    text = "naïve café 🦙 in 1234 \n\n  spaced  "  # characters it never saw come back through bytes
    assert bpe300.decode(bpe300.encode(text)) == text


def test_bpe_is_deterministic_and_cached_in_the_workdir(bpe300, corpus, tmp_path, monkeypatch):
    again = data.make_tokenizer("bpe:300", corpus, tmp_path / "a")
    assert again.model_bytes == bpe300.model_bytes
    [name] = os.listdir(tmp_path / "a")
    assert re.fullmatch(r"bpe300-[0-9a-f]{16}\.model", name)

    def no_training(*args, **kwargs):
        raise AssertionError("trained again")
    monkeypatch.setattr(sentencepiece.SentencePieceTrainer, "train", no_training)
    assert data.make_tokenizer("bpe:300", corpus, tmp_path / "a").model_bytes == bpe300.model_bytes
    with pytest.raises(AssertionError, match="trained again"):  # another text is another model
        data.make_tokenizer("bpe:300", corpus + "more\n", tmp_path / "a")


def test_bpe_splits_digits(corpus, tmp_path):
    text = corpus + "".join(f"{i * 7919 % 100_000} {i % 97}\n" for i in range(10_000))
    tokenizer = data.make_tokenizer("bpe:400", text, tmp_path)
    sp = sentencepiece.SentencePieceProcessor(model_proto=tokenizer.model_bytes)
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size()) if not sp.is_byte(i)]
    with_digits = [piece for piece in pieces if any(c.isdigit() for c in piece)]
    assert sorted(with_digits) == list("0123456789")  # each digit its own piece, never merged


def test_bpe_sizes_give_more_merges(bpe300, bpe512, corpus):
    assert bpe512.vocab_size == 512
    assert len(bpe512.encode(corpus)) < len(bpe300.encode(corpus))


def test_bpe_on_a_large_text_samples_lines_deterministically(corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(data, "MAX_TRAINING_LINES", 500)
    lines = data._training_sentences(corpus)
    assert len(lines) == 500 and lines == data._training_sentences(corpus)
    first = data.make_tokenizer("bpe:400", corpus, tmp_path / "one")
    second = data.make_tokenizer("bpe:400", corpus, tmp_path / "two")
    assert first.model_bytes == second.model_bytes
    assert first.decode(first.encode(corpus)) == corpus


def test_bpe_training_cuts_long_lines():
    assert data._training_sentences("a" * 2500 + "\n\nb\n") == ["a" * 1000, "a" * 1000, "a" * 500, "b"]


@pytest.mark.parametrize("spec, message", [
    ("bpe:", "must be a whole number"),
    ("bpe:abc", "must be a whole number"),
    ("bpe:-5", "must be a whole number"),
    ("bpe:1e3", "must be a whole number"),
    ("bpe: 300", "must be a whole number"),
    ("bpe:100", "N must be at least 260"),
    ("bpe:259", "N must be at least 260"),
    ("bpe:290", r"too few pieces for this text.*use bpe:\d+ or more"),
    ("bpe:100000", "it supports at most [0-9]+ pieces; choose a smaller N"),
])
def test_bad_bpe_specs(spec, message, corpus, tmp_path):
    with pytest.raises(DataError, match=f"^{re.escape(spec)}: .*{message}") as error:
        data.make_tokenizer(spec, corpus, tmp_path)
    assert "\n" not in str(error.value)
    assert os.listdir(tmp_path) == []  # no model left behind


def test_bpe_too_few_pieces_suggests_a_size_that_works(corpus, tmp_path):
    with pytest.raises(DataError) as error:
        data.make_tokenizer("bpe:290", corpus, tmp_path)
    smallest = int(re.search(r"use bpe:(\d+) or more", str(error.value)).group(1))
    assert data.make_tokenizer(f"bpe:{smallest}", corpus, tmp_path).vocab_size == smallest
    with pytest.raises(DataError, match="too few pieces"):
        data.make_tokenizer(f"bpe:{smallest - 1}", corpus, tmp_path)


def test_path_spec_loads_a_sentencepiece_model(bpe300, tmp_path):
    path = tmp_path / "my.model"
    path.write_bytes(bpe300.model_bytes)
    tokenizer = data.make_tokenizer(str(path), "any text", tmp_path / "work")
    assert isinstance(tokenizer, SentencePieceTokenizer)
    assert tokenizer.model_bytes == bpe300.model_bytes


def test_path_spec_errors(tmp_path):
    with pytest.raises(DataError, match=r"nope\.model: no such file \(a tokenizer is 'char', 'bpe:N'"):
        data.make_tokenizer(str(tmp_path / "nope.model"), "text", tmp_path)
    with pytest.raises(DataError, match="is a directory"):
        data.make_tokenizer(str(tmp_path), "text", tmp_path)
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"this is not a protobuf \xff\xfe")
    with pytest.raises(DataError, match=f"^{re.escape(str(junk))} is not a SentencePiece model"):
        data.make_tokenizer(str(junk), "text", tmp_path)


# ---- coverage -------------------------------------------------------------------------------------------
def test_coverage_of_a_char_tokenizer():
    tokenizer = CharTokenizer("abc \n")
    data.check_coverage(tokenizer, "abc cab\n")
    with pytest.raises(DataError) as error:
        data.check_coverage(tokenizer, "abc\nabé cxa", tokenizer_name="the tokenizer of w.safetensors",
                            data_name="new.txt")
    assert str(error.value) == ("the tokenizer of w.safetensors does not cover new.txt: 'é' at offset 6 "
                                "is not in its vocabulary")  # 'é' comes before 'x'


def test_coverage_of_sentencepiece_without_byte_fallback():
    lines = ["the cat sat on the mat", "a cat and a hat", "that is that"] * 20
    tokenizer = train_sentencepiece(lines, model_type="bpe", vocab_size=30, byte_fallback=False,
                                    character_coverage=1.0, normalization_rule_name="identity")
    data.check_coverage(tokenizer, "the hat sat on a mat that cat")
    with pytest.raises(DataError, match=r"'\\n' at offset 4 "):  # trained on lines: no newline piece
        data.check_coverage(tokenizer, "that\ncat")
    with pytest.raises(DataError, match=r"^the tokenizer does not cover the data: 'é' at offset 11 is "
                                        r"not in its vocabulary$"):
        data.check_coverage(tokenizer, "the cat is é")


def test_coverage_of_sentencepiece_with_byte_fallback(bpe300):
    data.check_coverage(bpe300, "Ωμέγα 🦙 \x00 \U0010FFFF")


# ---- the token cache ------------------------------------------------------------------------------------
def test_token_ids_are_cached_uint16_and_read_only(corpus, tmp_path):
    tokenizer = CountingTokenizer(CharTokenizer.from_text(corpus))
    ids = data.token_ids(corpus, tokenizer, tmp_path / "cache")
    assert isinstance(ids, np.memmap) and ids.dtype == np.uint16
    assert ids.tolist() == CharTokenizer.from_text(corpus).encode(corpus)
    [name] = os.listdir(tmp_path / "cache")
    assert re.fullmatch(r"tokens-[0-9a-f]{16}\.u16", name)
    assert not ids.flags.writeable
    with pytest.raises(ValueError):
        ids[0] = 1
    calls = tokenizer.encode_calls
    assert calls >= 1
    again = data.token_ids(corpus, tokenizer, tmp_path / "cache")
    assert tokenizer.encode_calls == calls  # mapped, not encoded again
    assert np.array_equal(again, ids)


def test_token_cache_names_text_and_tokenizer(corpus, bpe300, tmp_path):
    char = CharTokenizer.from_text(corpus)
    data.token_ids(corpus, char, tmp_path)
    data.token_ids(corpus[:-1], char, tmp_path)                      # another text
    data.token_ids(corpus, CharTokenizer.from_text(corpus + "é"), tmp_path)  # another char vocabulary
    data.token_ids(corpus, bpe300, tmp_path)                         # another kind
    names = os.listdir(tmp_path)
    assert len(names) == 4 and all(name.startswith("tokens-") for name in names)  # no temporary files


def test_token_cache_write_is_atomic(corpus, tmp_path):
    class Failing(CountingTokenizer):
        def encode(self, text, bos=False, eos=False, special=True):
            raise RuntimeError("interrupted")
    with pytest.raises(RuntimeError, match="interrupted"):
        data.token_ids(corpus, Failing(CharTokenizer.from_text(corpus)), tmp_path)
    assert os.listdir(tmp_path) == []


def test_token_ids_uint32_for_a_large_vocabulary(tmp_path):
    tokenizer = CharTokenizer(chr(0x10000 + i) for i in range(70_000))
    text = chr(0x10000) + chr(0x10000 + 69_999) + chr(0x10000 + 65_536)
    ids = data.token_ids(text, tokenizer, tmp_path)
    assert ids.dtype == np.uint32 and ids.tolist() == [0, 69_999, 65_536]
    assert os.listdir(tmp_path)[0].endswith(".u32")


def test_char_chunks_equal_one_shot_encoding(monkeypatch, tmp_path):
    text = "short\n" + "a line longer than a chunk " * 10 + "\n\n\nend without newline"
    tokenizer = CountingTokenizer(CharTokenizer.from_text(text))
    monkeypatch.setattr(data, "CHUNK_CHARS", 16)
    ids = data.token_ids(text, tokenizer, tmp_path)
    assert tokenizer.encode_calls > 3
    assert ids.tolist() == tokenizer.encode(text)


def test_line_chunks_cut_after_newlines():
    text = "ab\ncd\nefghijkl\nm"
    chunks = list(data._line_chunks(text, 4))
    assert "".join(chunks) == text
    assert chunks == ["ab\n", "cd\n", "efghijkl\n", "m"]


@pytest.mark.parametrize("which", ["bpe300", "bpe512"])
def test_sentencepiece_chunks_equal_one_shot_encoding(which, request, corpus, monkeypatch, tmp_path):
    tokenizer = CountingTokenizer(request.getfixturevalue(which))
    assert data._newline_is_a_boundary(tokenizer)
    text = corpus[:20_000] + "\n\n  two spaces after blank lines\n \n trailing "
    monkeypatch.setattr(data, "CHUNK_CHARS", 1000)
    ids = data.token_ids(text, tokenizer, tmp_path)
    assert tokenizer.encode_calls > 10
    assert ids.tolist() == tokenizer.encode(text)
    assert tokenizer.decode(ids.tolist()) == text


@pytest.mark.skipif(not os.path.isfile(LLAMA_TOKENIZER), reason="no ../shared/data/llama2-tokenizer.model")
def test_llama_tokenizer_chunks_equal_one_shot_encoding(corpus, monkeypatch, tmp_path):
    tokenizer = SentencePieceTokenizer.from_file(LLAMA_TOKENIZER)
    assert data._newline_is_a_boundary(tokenizer)
    text = corpus[:5000] + "\n\n   indented\n\tTab\n日本語\n \nend"
    monkeypatch.setattr(data, "CHUNK_CHARS", 200)
    ids = data.token_ids(text, tokenizer, tmp_path)
    assert ids.dtype == np.uint16
    assert ids.tolist() == tokenizer.encode(text)


def test_sentencepiece_with_a_newline_piece_is_encoded_in_one_call(monkeypatch, tmp_path):
    lines = ["one line", "another line", "and one more"] * 20
    inner = train_sentencepiece(lines, model_type="bpe", vocab_size=300, byte_fallback=True,
                                user_defined_symbols=["\n"], normalization_rule_name="identity")
    assert not data._newline_is_a_boundary(inner)
    tokenizer = CountingTokenizer(inner)
    text = "one line\nanother line\n" * 50
    monkeypatch.setattr(data, "CHUNK_CHARS", 30)
    ids = data.token_ids(text, tokenizer, tmp_path)
    assert tokenizer.encode_calls == 1
    assert ids.tolist() == inner.encode(text, special=False)  # (a user-defined piece as sentencepiece reads it)


# ---- splits ---------------------------------------------------------------------------------------------
def test_split_fractions_are_views(tmp_path):
    ids = data.token_ids("abcdefghij" * 100, CharTokenizer("abcdefghij"), tmp_path)
    train, val = data.split(ids, 0.1)
    assert (len(train), len(val)) == (900, 100)
    assert np.array_equal(np.concatenate([train, val]), ids)
    assert np.shares_memory(train, ids) and np.shares_memory(val, ids)
    train, val = data.split(ids, 0.25)
    assert (len(train), len(val)) == (750, 250)
    train, val = data.split(ids)
    assert len(val) == 100
    for n, fraction, n_val in ((100, 0.29, 29), (1000, 0.07, 70), (10, 0.7, 7), (7, 0.5, 3), (5, 0.1, 0)):
        train, val = data.split(np.arange(n), fraction)
        assert (len(train), len(val)) == (n - n_val, n_val)


def test_split_without_validation():
    ids = np.arange(10)
    train, val = data.split(ids, 0)
    assert len(train) == 10 and len(val) == 0


@pytest.mark.parametrize("fraction", [1, 1.5, -0.1])
def test_split_rejects_fractions_outside_0_1(fraction):
    with pytest.raises(DataError, match=r"must be in \[0, 1\)"):
        data.split(np.arange(10), fraction)


def test_check_long_enough():
    data.check_long_enough(np.arange(9), np.arange(9), context=8)      # exactly context + 1
    data.check_long_enough(np.arange(9), np.arange(0), context=8)      # no validation
    with pytest.raises(DataError) as error:
        data.check_long_enough(np.arange(8), np.arange(100), context=8)
    assert str(error.value) == ("the data has 8 training tokens, fewer than one context window "
                                "(context + 1 = 9); use more text or a smaller context")
    assert error.value.message(flag) == ("the data has 8 training tokens, fewer than one context window "
                                         "(context + 1 = 9); use more text or a smaller --context")
    with pytest.raises(DataError, match=r"^the data has 5 validation tokens, fewer than one context "
                                        r"window \(context \+ 1 = 9\)"):
        data.check_long_enough(np.arange(100), np.arange(5), context=8)
    with pytest.raises(DataError, match="0 training tokens"):
        data.check_long_enough(np.arange(0), np.arange(0), context=8)


# ---- batches --------------------------------------------------------------------------------------------
def test_random_batch_shapes_and_shift(tmp_path):
    ids = data.token_ids("".join(chr(97 + i % 26) for i in range(5000)), CharTokenizer(
        "abcdefghijklmnopqrstuvwxyz"), tmp_path)
    rng = np.random.default_rng(0)
    x, y = data.random_batch(ids, 6, 32, rng)
    assert x.shape == y.shape == (6, 32) and x.dtype == y.dtype == np.int64
    assert type(x) is np.ndarray
    assert np.array_equal(x[:, 1:], y[:, :-1])
    assert np.array_equal(y, (x + 1) % 26)  # the text is a, b, ..., z, a, ...
    assert np.array_equal(x, (x[:, :1] + np.arange(32)) % 26)


def test_random_batch_windows_come_from_the_stream_and_reach_its_end():
    ids = np.arange(20, dtype=np.uint16)
    rng = np.random.default_rng(1)
    starts = set()
    for _ in range(200):
        x, y = data.random_batch(ids, 4, 5, rng)
        assert np.array_equal(x - x[:, :1], np.broadcast_to(np.arange(5), (4, 5)))
        assert np.array_equal(y, x + 1)
        starts.update(x[:, 0].tolist())
    assert starts == set(range(15))  # every offset 0 .. len - context - 1, and no further
    x, y = data.random_batch(np.arange(6), 3, 5, rng)  # one window exactly
    assert np.array_equal(x, np.tile(np.arange(5), (3, 1)))
    with pytest.raises(DataError):
        data.random_batch(np.arange(5), 3, 5, rng)


def test_random_batch_resumes_from_the_rng_state():
    ids = np.arange(10_000)
    rng = np.random.default_rng(7)
    data.random_batch(ids, 4, 16, rng)
    state = rng.bit_generator.state
    expected = [data.random_batch(ids, 4, 16, rng) for _ in range(3)]
    resumed = np.random.default_rng(12345)
    resumed.bit_generator.state = state
    for x, y in expected:
        x2, y2 = data.random_batch(ids, 4, 16, resumed)
        assert np.array_equal(x, x2) and np.array_equal(y, y2)
    fresh = data.random_batch(ids, 4, 16, np.random.default_rng(8))
    assert not np.array_equal(fresh[0], expected[0][0])


@pytest.mark.parametrize("n, context, batch_size", [(1, 4, 1), (2, 4, 1), (5, 4, 1), (6, 4, 1),
                                                    (17, 4, 3), (100, 7, 4), (100, 99, 2), (100, 200, 2)])
def test_sequential_windows_count_every_token_after_the_first_once(n, context, batch_size):
    ids = np.arange(1000, 1000 + n, dtype=np.uint16)
    inputs, targets, batches = [], [], 0
    for x, y in data.sequential_windows(ids, context, batch_size):
        batches += 1
        assert x.dtype == y.dtype == np.int64
        assert x.shape == y.shape and x.shape[1] == context and 1 <= x.shape[0] <= batch_size
        valid = y != -100
        assert np.array_equal(y[valid], x[valid] + 1)  # the next token of the stream
        assert np.all(x[~valid] == 0)
        for row in valid:  # padding only at the end of a row
            assert not np.any(row[np.argmin(row):]) or row.all()
        inputs.extend(x[valid].tolist())
        targets.extend(y[valid].tolist())
    assert targets == ids[1:].tolist()
    assert inputs == ids[:-1].tolist()
    assert data.sequential_batch_count(n, context, batch_size) == batches
