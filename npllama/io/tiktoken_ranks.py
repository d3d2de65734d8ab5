"""Meta's Llama 3 tokenizer.model (3, 3.1, 3.2, 3.3): a tiktoken rank file, rebuilt as HF's byte-level BPE.

The file. Not SentencePiece: one line per token, `base64(token bytes) SPACE rank`, 128,000 lines with
ranks 0..127999 (the rank is the token id). The 256 single bytes are tokens; every longer token was
made by BPE training from two earlier ones, so a token's rank also says when it was learned.

tiktoken's BPE (how Meta encodes). The text is cut into pieces by bpe_json.LLAMA3_PATTERN (words with
one leading non-letter, numbers of at most 3 digits, punctuation runs, whitespace runs); a piece that is
itself a token is that token; any other starts as its bytes and, while some adjacent pair joins into a
token, joins the pair whose join has the lowest rank (the leftmost on a tie).

HF's BPE (what tokenizer.json describes) instead applies a list of merges, "A B" -> "AB", the earliest
merge in the list first. The same ids come out when the list holds, for each token T, the pair tiktoken's
own loop ends with on T's bytes, listed in T's rank order:

    merge(T) = the last two parts left when tiktoken's loop runs on T's bytes alone;
               none when the loop gets stuck before (T is then never built from parts).

E.g. ranks {..., "bc": 256, "ab": 257, "cd": 258, "abcd": 259, "bcd": 260}: on "abcd" the loop joins
b+c (256, below 257 and 258), then bc+d (260: "abc" is no token), then a+bcd; so merge("abcd") = "a bcd",
though "abcd" was learned as ab+cd. Why it is exact: when tiktoken joins X+Y inside a longer piece, no
earlier join crossed the edges of the span XY and the joins inside it came in the order the loop on XY
alone makes them, so X+Y is merge(XY); each token having one merge, the ranks order the merges as
tiktoken orders the joins. A piece that is itself a token stays whole ("ignore_merges", as in tiktoken).
(transformers' converter stops the loop at T's own rank, which loses merges like "a bcd": "abcdx" then
encodes as a, bcd, x where tiktoken gives abcd, x. Its newer version lists every split of T into two
tokens: up to twice as many merges.)

Byte-level. HF's BPE works on strings, so each byte is written as one printable character (GPT-2's
bytes_to_unicode: printable Latin-1 bytes as themselves, the others as U+0100 onwards, e.g. a space as
"Ġ"); the ByteLevel pre-tokenizer and decoder apply and undo it.

Special tokens are not in the file: 256 follow the base vocabulary (128000..128255), <|begin_of_text|>
first (BOS, which the post-processor adds). Their names changed with Llama 3.1, and the file cannot say
which apply (3 to 3.3 share its 128,000 tokens). The default, llama_version "3.1", is HF's naming in the
Llama 3.1/3.2/3.3 tokenizer.json files: <|finetune_right_pad_id|> 128004, <|start_header_id|> 128006,
<|end_header_id|> 128007, <|eom_id|> 128008, <|eot_id|> 128009, <|python_tag|> 128010, the other slots
<|reserved_special_token_0|>, _1, ... in order. llama_version "3" names only BOS, EOS, the headers and
<|eot_id|>, at the same ids, and reserves the rest; so only reserved names can be wrong. (Meta's
llama-models names 128005 <|step_id|> and numbers the reserved ones after it from 2.) A Meta params.json
with "use_scaled_rope" belongs to 3.1 or later.
"""
import base64
import binascii
import re

from ..errors import TokenizerError
from . import bpe_json
BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"  # a base model's; instruct models also stop at END_OF_TURN
END_OF_TURN = ("<|eom_id|>", "<|eot_id|>")
SPECIAL_TOKEN_COUNT = 256
NAMED_SPECIAL_TOKENS = {  # version -> {slot after the base vocabulary: name}; the other slots are reserved
    "3": {0: BOS, 1: EOS, 6: "<|start_header_id|>", 7: "<|end_header_id|>", 9: "<|eot_id|>"},
    "3.1": {0: BOS, 1: EOS, 4: "<|finetune_right_pad_id|>", 6: "<|start_header_id|>", 7: "<|end_header_id|>",
            8: "<|eom_id|>", 9: "<|eot_id|>", 10: "<|python_tag|>"},
}

_RANK_LINE = re.compile(rb"[A-Za-z0-9+/]+={0,2} [0-9]+\r?")
_NO_TOKEN = float("inf")  # the rank of a join that is no token
_PEEK = 1024  # bytes is_rank_file looks at: more than the longest line of a real file


def _bytes_to_unicode():
    """GPT-2's byte -> character map: printable Latin-1 bytes stand for themselves, the other 68 bytes
    take the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


_BYTE_CHARS = _bytes_to_unicode()  # as a str.translate table: Latin-1 code point -> byte-level character


def byte_level(token):
    """A token's bytes as the string HF's byte-level BPE knows it by, e.g. b" the" -> "Ġthe"."""
    return token.decode("latin-1").translate(_BYTE_CHARS)


def is_rank_file(data):
    """Whether data starts like a rank file (first line `base64 rank`), not a SentencePiece model
    (a protobuf, which starts with byte 0x0A)."""
    first_line = bytes(data[:_PEEK]).split(b"\n", 1)[0]
    return _RANK_LINE.fullmatch(first_line) is not None


def read_ranks(data, source):
    """The tokens in rank order (token id -> bytes), checked: ranks 0..N-1 once each, tokens distinct,
    every single byte a token (so that any text can be encoded)."""
    tokens = {}  # rank -> bytes
    rank_of = {}  # bytes -> rank
    for number, line in enumerate(bytes(data).splitlines(), 1):
        if not line.strip():
            continue
        where = f"{source}: line {number}"
        fields = line.split()
        if len(fields) != 2:
            raise TokenizerError(f"{where}: expected 'base64-token rank', got {len(fields)} fields")
        try:
            token = base64.b64decode(fields[0], validate=True)
        except binascii.Error:
            raise TokenizerError(f"{where}: the token {fields[0][:40].decode('ascii', 'replace')!r} "
                                 f"is not valid base64") from None
        if not fields[1].isdigit():
            raise TokenizerError(f"{where}: the rank {fields[1][:40].decode('ascii', 'replace')!r} "
                                 f"is not a non-negative integer")
        rank = int(fields[1])
        if not token:
            raise TokenizerError(f"{where}: the token is empty")
        if rank in tokens:
            raise TokenizerError(f"{where}: rank {rank} is given twice")
        if token in rank_of:
            raise TokenizerError(f"{where}: token {token!r} is given twice (ranks {rank_of[token]} and {rank})")
        tokens[rank] = token
        rank_of[token] = rank
    if not tokens:
        raise TokenizerError(f"{source}: the rank file holds no tokens")
    missing = next((rank for rank in range(len(tokens)) if rank not in tokens), None)
    if missing is not None:
        raise TokenizerError(f"{source}: ranks must run 0..{len(tokens) - 1} without gaps; rank {missing} "
                             f"is missing")
    lacking = [b for b in range(256) if bytes([b]) not in rank_of]
    if lacking:
        raise TokenizerError(f"{source}: {len(lacking)} single bytes have no token (the first: "
                             f"0x{lacking[0]:02X}); a byte-level BPE needs all 256")
    return [tokens[rank] for rank in range(len(tokens))]


def last_merge(token, rank_of):
    """merge(token) of the module docstring: the two parts tiktoken's loop leaves last on the token's
    bytes, or None when the loop gets stuck earlier."""
    parts = [token[i:i + 1] for i in range(len(token))]
    joins = [rank_of.get(left + right, _NO_TOKEN) for left, right in zip(parts, parts[1:])]  # of parts i, i+1
    while len(parts) > 2:
        lowest = min(joins)
        if lowest == _NO_TOKEN:
            return None
        i = joins.index(lowest)  # the leftmost of the lowest
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
        del joins[i]  # only the joins with the new part's neighbours change
        if i > 0:
            joins[i - 1] = rank_of.get(parts[i - 1] + parts[i], _NO_TOKEN)
        if i < len(joins):
            joins[i] = rank_of.get(parts[i] + parts[i + 1], _NO_TOKEN)
    return tuple(parts) if len(parts) == 2 else None


def merges_of(tokens):
    """HF's merge list for the tokens in rank order: merge(T) of every token that has one, in rank order."""
    rank_of = {token: rank for rank, token in enumerate(tokens)}
    merges = (last_merge(token, rank_of) for token in tokens if len(token) > 1)
    return [f"{byte_level(left)} {byte_level(right)}" for left, right in filter(None, merges)]


def special_token_names(llama_version="3.1"):
    """The 256 special tokens' names in id order: the version's named tokens in their slots, the other
    slots <|reserved_special_token_0|>, _1, ... in order."""
    try:
        named = NAMED_SPECIAL_TOKENS[llama_version]
    except KeyError:
        raise TokenizerError(f"unknown Llama 3 version {llama_version!r} for the special tokens' names; "
                             f"known: {', '.join(NAMED_SPECIAL_TOKENS)}") from None
    reserved = (f"<|reserved_special_token_{i}|>" for i in range(SPECIAL_TOKEN_COUNT))
    return [named[slot] if slot in named else next(reserved) for slot in range(SPECIAL_TOKEN_COUNT)]


def to_tokenizer_json(data, source, llama_version="3.1"):
    """HF's tokenizer.json (a string) for a Llama 3 rank file, as HF's Llama 3 files: byte-level BPE with
    the merges recovered from the ranks, the Llama 3 pre-tokenizer, the 256 special tokens (named as in
    llama_version "3" or "3.1", see the module docstring) and BOS added by the post-processor."""
    tokens = read_ranks(data, source)
    added = [bpe_json.added_token(len(tokens) + slot, name)
             for slot, name in enumerate(special_token_names(llama_version))]
    vocab = {byte_level(token): rank for rank, token in enumerate(tokens)}
    return bpe_json.byte_level_bpe(vocab, merges_of(tokens), added, "llama-bpe", bos=(BOS, len(tokens)),
                                   ignore_merges=True)
