"""Meta's Llama 3 tokenizer.model (a tiktoken rank file) rebuilt as HF's byte-level BPE: the converted
tokenizer gives tiktoken's ids (tests/fixtures/tiktoken/, written by make_tiktoken_fixture.py with tiktoken,
read here without it), decodes back to the text, names the special tokens as HF's files do, and a
malformed file is refused in one line that names it."""
import base64
import json
import os

import pytest
import tokenizers

from npllama.io import bpe_json, tiktoken_ranks
from npllama.io.tokenizer import TokenizerError
from tests.conftest import ROOT

FIXTURES = os.path.join(ROOT, "tests", "fixtures", "tiktoken")
RANK_FILE = os.path.join(FIXTURES, "llama3_like.tiktoken")
SENTENCEPIECE_MODEL = os.path.join(ROOT, "tests", "fixtures", "import", "tokenizer.model")
with open(os.path.join(FIXTURES, "cases.json"), encoding="utf-8") as _file:
    EXPECTED = json.load(_file)
CASES = {case["name"]: case for case in EXPECTED["cases"]}

BYTES = [bytes([b]) for b in range(256)]  # rank = byte value, so that ids below 256 read as bytes
# The module docstring's example: "abcd" was learned as ab+cd, but tiktoken's loop on its bytes joins
# b+c, then bc+d ("bcd", ranked AFTER "abcd"), then a+bcd. Ids checked with tiktoken.
PASSES_THROUGH = BYTES + [b"bc", b"ab", b"cd", b"abcd", b"bcd"]  # 256 257 258 259 260
STUCK = BYTES + [b"bc", b"ab", b"cd", b"abcd"]  # no "bcd": the loop stops at a, bc, d


def rank_file(tokens, ranks=None):
    ranks = range(len(tokens)) if ranks is None else ranks
    return "".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in zip(tokens, ranks)).encode()


def encoder(data, version="3.1"):
    return tokenizers.Tokenizer.from_str(tiktoken_ranks.to_tokenizer_json(data, "test.tiktoken", version))


@pytest.fixture(scope="module")
def data():
    with open(RANK_FILE, "rb") as file:
        return file.read()


@pytest.fixture(scope="module")
def converted(data):
    return json.loads(tiktoken_ranks.to_tokenizer_json(data, RANK_FILE))


@pytest.fixture(scope="module")
def llama3_like(data):
    return encoder(data)


# ---- the ids: tiktoken's, for every fixture text ------------------------------------------------------
@pytest.mark.parametrize("name", CASES)
def test_ids_equal_tiktoken(llama3_like, name):
    case = CASES[name]
    assert llama3_like.encode(case["text"], add_special_tokens=False).ids == case["ids"]


@pytest.mark.parametrize("name", CASES)
def test_decode_gives_the_text_back(llama3_like, name):
    text = CASES[name]["text"]
    ids = llama3_like.encode(text, add_special_tokens=False).ids
    assert llama3_like.decode(ids, skip_special_tokens=False) == text


def test_bos_is_added_by_the_post_processor(llama3_like):
    case = CASES["unicode"]
    bos = EXPECTED["base_vocabulary"]
    assert llama3_like.encode(case["text"]).ids == [bos] + case["ids"]
    assert llama3_like.id_to_token(bos) == "<|begin_of_text|>"


def test_a_token_built_through_a_later_token():
    rank_of = {token: rank for rank, token in enumerate(PASSES_THROUGH)}
    assert tiktoken_ranks.last_merge(b"abcd", rank_of) == (b"a", b"bcd")
    tokenizer = encoder(rank_file(PASSES_THROUGH))
    assert tokenizer.encode("abcdx", add_special_tokens=False).ids == [259, ord("x")]
    assert tokenizer.encode(" abcd", add_special_tokens=False).ids == [ord(" "), 259]


def test_a_token_the_loop_never_builds_has_no_merge_but_is_kept_whole():
    rank_of = {token: rank for rank, token in enumerate(STUCK)}
    assert tiktoken_ranks.last_merge(b"abcd", rank_of) is None
    assert "ab cd" not in tiktoken_ranks.merges_of(STUCK)
    tokenizer = encoder(rank_file(STUCK))
    assert tokenizer.encode("abcd", add_special_tokens=False).ids == [259]  # a piece that is a token
    assert tokenizer.encode("abcdx", add_special_tokens=False).ids == [ord("a"), 256, ord("d"), ord("x")]


# ---- the tokenizer.json ------------------------------------------------------------------------------
def test_merges_are_pairs_of_tokens_in_the_rank_order_of_their_join(converted):
    vocab = converted["model"]["vocab"]
    assert len(vocab) == EXPECTED["base_vocabulary"] and sorted(vocab.values()) == list(range(len(vocab)))
    joined_ranks = []
    for merge in converted["model"]["merges"]:
        left, right = merge.split(" ")
        assert left in vocab and right in vocab
        joined_ranks.append(vocab[left + right])
    assert joined_ranks == sorted(set(joined_ranks))  # one merge per token, in rank order
    assert converted["model"]["ignore_merges"] is True
    assert converted["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] == bpe_json.LLAMA3_PATTERN


def test_byte_level_spelling(converted):
    singles = {token for token in converted["model"]["vocab"] if len(token) == 1}  # the 256 bytes
    assert len(singles) == 256 and "Ġ" in singles and " " not in singles
    assert tiktoken_ranks.byte_level(b" the\n\xff") == "ĠtheĊÿ"


def test_special_tokens_are_hfs_llama_3_1_names_by_default(converted):
    added = {token["content"]: token["id"] for token in converted["added_tokens"]}
    assert added == EXPECTED["special_tokens"]
    assert all(token["special"] and not token["normalized"] for token in converted["added_tokens"])


def test_llama_3_names():
    hf_llama3 = (["<|begin_of_text|>", "<|end_of_text|>"]
                 + [f"<|reserved_special_token_{i}|>" for i in range(4)]
                 + ["<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"]
                 + [f"<|reserved_special_token_{i}|>" for i in range(5, 251)])
    assert tiktoken_ranks.special_token_names("3") == hf_llama3
    with pytest.raises(TokenizerError, match="unknown Llama 3 version '2'"):
        tiktoken_ranks.special_token_names("2")


# ---- telling the file apart, and refusing bad ones ---------------------------------------------------
def test_is_rank_file(data):
    with open(SENTENCEPIECE_MODEL, "rb") as file:
        sentencepiece_model = file.read()
    assert tiktoken_ranks.is_rank_file(data)
    assert tiktoken_ranks.is_rank_file(b"IQ== 0")
    assert not tiktoken_ranks.is_rank_file(sentencepiece_model)
    assert not tiktoken_ranks.is_rank_file(b"")
    assert not tiktoken_ranks.is_rank_file(b"hello world\n")


MALFORMED = {
    "bad base64": (b"IQ== 0\n!!!! 1\n", "line 2: the token '!!!!' is not valid base64"),
    "non-integer rank": (b"IQ== zero\n", "line 1: the rank 'zero' is not a non-negative integer"),
    "negative rank": (b"IQ== -1\n", "line 1: the rank '-1' is not a non-negative integer"),
    "one field": (b"IQ==\n", "line 1: expected 'base64-token rank', got 1 fields"),
    "duplicate rank": (rank_file([b"a", b"b"], [0, 0]), "line 2: rank 0 is given twice"),
    "duplicate token": (rank_file([b"a", b"a"]), "line 2: token b'a' is given twice (ranks 0 and 1)"),
    "missing rank": (rank_file(BYTES + [b"ab"], [*range(256), 257]), "rank 256 is missing"),
    "missing byte": (rank_file(BYTES[:255]), "1 single bytes have no token (the first: 0xFF)"),
    "empty": (b"\n\n", "the rank file holds no tokens"),
}


@pytest.mark.parametrize("name", MALFORMED)
def test_malformed_rank_files_are_refused(name):
    data, message = MALFORMED[name]
    with pytest.raises(TokenizerError) as error:
        tiktoken_ranks.to_tokenizer_json(data, "bad.tiktoken")
    assert str(error.value).startswith("bad.tiktoken: ") and message in str(error.value)
    assert "\n" not in str(error.value)


def test_a_sentencepiece_model_is_refused():
    with open(SENTENCEPIECE_MODEL, "rb") as file:
        with pytest.raises(TokenizerError, match="^tokenizer.model: line"):
            tiktoken_ranks.to_tokenizer_json(file.read(), "tokenizer.model")


def test_a_meta_llama3_directory_reads_its_rank_file_and_scaled_rope(tmp_path):
    """Meta's Llama 3.x directories: tokenizer.model is a rank file (read as byte-level BPE, stopping at
    Llama 3's end-of-turn tokens too), params.json says use_scaled_rope (3.2 also its factor, 32)."""
    import numpy as np
    from npllama.io import common, meta
    (tmp_path / "tokenizer.model").write_bytes(open(RANK_FILE, "rb").read())
    tokenizer = common.directory_tokenizer(str(tmp_path))
    base = tokenizer.vocab_size - 256
    assert tokenizer.bos_id == base and tokenizer.eos_ids == (base + 1, base + 8, base + 9)
    params = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "norm_eps": 1e-5, "rope_theta": 500000.0,
              "use_scaled_rope": True, "vocab_size": tokenizer.vocab_size}
    shards = [{"tok_embeddings.weight": np.zeros((tokenizer.vocab_size, 64), np.float32),
               "layers.0.feed_forward.w1.weight": np.zeros((128, 64), np.float32)}]
    assert meta._meta_config("params.json", params, shards).rope_scaling["factor"] == 8.0  # 3.1's
    config = meta._meta_config("params.json", {**params, "rope_scaling_factor": 32}, shards)
    assert config.rope_scaling == {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert config.tie_word_embeddings and config.vocab_size == tokenizer.vocab_size
