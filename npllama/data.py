"""The training data pipeline: text -> tokenizer -> cached token ids -> train/val split -> random batches.

    read_text(path)                          the file's exact text (strict UTF-8, no newline translation)
    builtin_text()                           BUILTIN_CORPUS, ~100 KB of Shakespeare shipped in the package
    make_tokenizer(spec, text, workdir)      'char' | 'bpe:N' (SentencePiece BPE trained on the text) |
                                             the path of a SentencePiece .model file
    check_coverage(tokenizer, text)          every character of the text must be encodable (no unk)
    token_ids(text, tokenizer, cache_dir)    the text's ids as one read-only memory-mapped array, encoded
                                             once and cached under a fingerprint of text and tokenizer
    split(ids, val_fraction)                 (train, val): the first (1 - f) of the stream, then the rest
    check_long_enough(train, val, context)   each split must hold one context window plus its target
    random_batch(ids, B, T, rng)             nanoGPT's get_batch: B windows at random offsets, y = x shifted
    sequential_windows(ids, T)               every prediction of a split exactly once, for evaluation

The text is one continuous token stream, as in nanoGPT: no BOS/EOS is inserted anywhere (not at the
start, not per line or per document). A training window starts at a random offset, usually mid-sentence,
so a BOS at offset 0 would be seen in a vanishing fraction of windows and teach nothing; the model learns
from context alone, and generation may still start from BOS or from any prompt.

Encoding in chunks. A large text is encoded a chunk of about CHUNK_CHARS characters at a time, each cut
just after a newline, so no giant list of ids is ever built. For the character tokenizer any cut gives
the same ids as encoding the whole text. SentencePiece adds a dummy-prefix '▁' at the start of every
encode call, so chunk k > 0 is encoded as "\\n" + chunk and the ids of "\\n" alone are dropped from the
front. That equals one-shot encoding exactly when no piece of the vocabulary contains a newline and a
newline survives normalization (true of Llama's tokenizer and of every bpe:N model made here, which are
trained on lines): then no piece spans a newline and the ids after one do not depend on the text before
it. A model where that does not hold is encoded in one call. A tokenizer.json BPE (whose pre-tokenizer
may join a newline to the spaces around it, as Llama 3's does) is encoded chunk by chunk after the
line before each chunk, that line's ids dropped; a cut is kept only where the line's ids alone begin
the ids of the line with the next one (nothing joins across the cut), else the chunks are encoded
together.
"""
import collections
import fractions
import hashlib
import io
import os
import re

import numpy as np
import sentencepiece

from .errors import UserError, setting
from .io import files
from .io.tokenizer import CharTokenizer, SentencePieceTokenizer, TokenizerError, load as load_tokenizer, to_metadata

BUILTIN_CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus",
                              "shakespeare-sample.txt")

CHUNK_CHARS = 1 << 20            # characters encoded per call by token_ids (cut at a newline)
CACHE_VERSION = b"npllama-tokens-2"  # part of the token cache's fingerprint: bump when encoding changes
BPE_VERSION = b"npllama-bpe-1"       # part of a bpe:N model's fingerprint: bump when training changes

# SentencePiece BPE training (make_tokenizer 'bpe:N'), with Llama's own trainer settings where they apply
SPECIAL_PIECES = 3               # <unk> = 0, <s> = 1, </s> = 2
BYTE_PIECES = 256                # <0x00>..<0xFF>: byte fallback spells any character the pieces lack
MIN_BPE_PIECES = SPECIAL_PIECES + BYTE_PIECES + 1
CHARACTER_COVERAGE = 0.9995      # characters rarer than this are spelled in bytes...
MIN_CHARACTER_COVERAGE = 0.98    # ...and a small vocabulary may lower it to this (sentencepiece's floor)
MAX_TRAINING_LINES = 1_000_000   # a larger text trains on this many of its lines, evenly spaced
MAX_LINE_CHARS = 1000            # longer lines are cut (sentencepiece skips lines over 4192 bytes)


class DataError(UserError):
    """Training data that cannot be used (message is one line, names the file, fit for the user)."""


# ---- text -----------------------------------------------------------------------------------------------
def decode_text(data, name):
    """Bytes as UTF-8 text, decoded strictly; where they are not UTF-8 is said in one line naming `name`."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        where = f"byte 0x{data[error.start]:02x} at offset {error.start}"
        if error.reason == "unexpected end of data":
            where += " (the file ends inside a character)"
        raise DataError(f"{name} is not UTF-8 text: {where}") from None


def read_text(path):
    """The exact text of a UTF-8 file (read as bytes and decoded strictly: '\\r\\n' stays '\\r\\n')."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise DataError(f"{path}: is a directory, not a text file")
    try:
        with open(path, "rb") as file:
            data = file.read()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as error:
        raise DataError(f"cannot read {path}: {error.strerror}") from None
    text = decode_text(data, path)
    if not text.strip():
        raise DataError(f"{path} is empty: there is no text" if not text else
                        f"{path} holds only whitespace: there is no text")
    return text


def builtin_text():
    """The built-in corpus: the first ~100 KB of Tiny Shakespeare (see corpus/README.md)."""
    return read_text(BUILTIN_CORPUS)


# ---- tokenizers -----------------------------------------------------------------------------------------
def make_tokenizer(spec, text, workdir):
    """The tokenizer `spec` names: 'char' (the text's sorted characters), 'bpe:N' (a SentencePiece BPE
    model of N pieces trained on the text, kept in workdir and reused for the same text and N), or the
    path of a tokenizer file (a SentencePiece .model or an HF tokenizer.json)."""
    spec = str(spec)
    if spec == "char":
        return CharTokenizer.from_text(text)
    if spec.startswith("bpe:"):
        return _bpe_tokenizer(spec, _bpe_size(spec), text, workdir)
    if not os.path.exists(spec):
        raise DataError(f"{spec}: no such file (a tokenizer is 'char', 'bpe:N', a SentencePiece "
                        f".model or a tokenizer.json file)")
    if os.path.isdir(spec):
        raise DataError(f"{spec}: is a directory, not a tokenizer file")
    try:
        return load_tokenizer(spec)
    except TokenizerError as error:
        raise DataError(str(error)) from None


def _bpe_size(spec):
    size = spec[len("bpe:"):]
    if not re.fullmatch(r"[0-9]+", size):
        raise DataError(f"{spec}: N in bpe:N must be a whole number of pieces, e.g. bpe:4096")
    size = int(size)
    if size < MIN_BPE_PIECES:
        raise DataError(f"{spec}: too few pieces; byte fallback alone takes {SPECIAL_PIECES} special + "
                        f"{BYTE_PIECES} byte pieces, so N must be at least {MIN_BPE_PIECES}")
    return size


def _bpe_tokenizer(spec, size, text, workdir):
    """Train (or reuse from workdir) the SentencePiece BPE model; written atomically."""
    fingerprint = hashlib.sha256(BPE_VERSION + b"\0" + str(size).encode() + b"\0" + text.encode("utf-8"))
    path = os.path.join(workdir, f"bpe{size}-{fingerprint.hexdigest()[:16]}.model")
    if os.path.isfile(path):
        try:
            return SentencePieceTokenizer.from_file(path)
        except TokenizerError:
            pass  # not a model after all: train it again
    sentences = _training_sentences(text)
    if not sentences:
        raise DataError(f"{spec}: the text has no line to train a tokenizer on")
    model = io.BytesIO()
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_writer=model,
            model_type="bpe", vocab_size=size,
            character_coverage=_character_coverage(spec, size, sentences),
            byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=True, split_digits=True, allow_whitespace_only_pieces=True,
            input_sentence_size=0, shuffle_input_sentence=False,  # _training_sentences already sampled
            num_threads=max(1, min(16, os.cpu_count() or 1)), minloglevel=2)
    except RuntimeError as error:
        raise DataError(f"{spec}: cannot train the tokenizer on this text: {_trainer_reason(error)}") \
            from None
    tokenizer = SentencePieceTokenizer(model.getvalue(), source=spec)
    os.makedirs(workdir, exist_ok=True)
    files.write_atomically(path, [model.getvalue()])
    return tokenizer


def _training_sentences(text):
    """The text's non-empty lines (sentencepiece trains on lines; a newline is a byte piece), long lines
    cut to MAX_LINE_CHARS, at most MAX_TRAINING_LINES of them evenly spaced (deterministic, unlike
    sentencepiece's own random sample)."""
    lines = []
    for line in text.split("\n"):
        lines.extend(line[i:i + MAX_LINE_CHARS] for i in range(0, len(line), MAX_LINE_CHARS))
    if len(lines) > MAX_TRAINING_LINES:
        lines = [lines[i * len(lines) // MAX_TRAINING_LINES] for i in range(MAX_TRAINING_LINES)]
    return lines


def _character_coverage(spec, size, sentences):
    """The character_coverage to train `size` pieces with: CHARACTER_COVERAGE, or less when the
    characters it needs would take more than half of the pieces beyond the special and byte ones (the
    other half is left to merges), but never less than MIN_CHARACTER_COVERAGE.

    Every character kept gets a piece; sentencepiece keeps the most frequent ones (counting '▁' for
    each space and each line's dummy prefix) until they make up the coverage fraction of the text.
    The rest are spelled in bytes, which for ASCII text costs nothing (one byte, one token)."""
    counts = collections.Counter()
    for sentence in sentences:
        counts.update("▁" + sentence.replace(" ", "▁"))
    frequencies = sorted(counts.values(), reverse=True)
    total = sum(frequencies)
    cumulative = np.cumsum([0] + frequencies)

    def needed(coverage):  # how many characters sentencepiece keeps for this coverage
        return int(np.searchsorted(cumulative, coverage * total, side="left"))

    room = size - SPECIAL_PIECES - BYTE_PIECES
    least = needed(MIN_CHARACTER_COVERAGE)
    if least > room:
        raise DataError(f"{spec}: too few pieces for this text; its commonest characters (making up "
                        f"{MIN_CHARACTER_COVERAGE:.0%} of it) need {least} pieces besides the "
                        f"{SPECIAL_PIECES + BYTE_PIECES} special and byte pieces: use "
                        f"bpe:{SPECIAL_PIECES + BYTE_PIECES + least} or more")
    keep = max(least, room // 2)
    if needed(CHARACTER_COVERAGE) <= keep:
        return CHARACTER_COVERAGE
    # a coverage between what the commonest keep - 1 and keep characters make up keeps exactly keep
    coverage = (cumulative[keep - 1] + cumulative[keep]) / 2 / total
    return min(CHARACTER_COVERAGE, max(MIN_CHARACTER_COVERAGE, float(coverage)))


def _trainer_reason(error):
    """sentencepiece's RuntimeError as one line, e.g. 'the text supports at most 10534 pieces'."""
    message = str(error).strip()
    most = re.search(r"Vocabulary size (?:is )?too high.*?<= *([0-9]+)", message)
    if most:
        return f"it supports at most {most.group(1)} pieces; choose a smaller N"
    lines = message.splitlines() or ["unknown error"]
    return lines[-1].split("] ", 1)[-1].strip() or lines[-1]


def check_coverage(tokenizer, text, tokenizer_name="the tokenizer", data_name="the data"):
    """Raise DataError unless the tokenizer can encode every character of the text (no unknown token;
    see Tokenizer.uncovered). `tokenizer_name` and `data_name` go into the message, e.g.
    check_coverage(tok, text, f"the tokenizer of {weights}", path)."""
    missing = tokenizer.uncovered(text)
    if missing:
        offset = min(text.find(c) for c in missing)
        raise DataError(f"{tokenizer_name} does not cover {data_name}: {text[offset]!r} at offset "
                        f"{offset} is not in its vocabulary")


# ---- token ids ------------------------------------------------------------------------------------------
def token_dtype(tokenizer):
    """uint16 when every id fits (vocab_size <= 65536), else uint32."""
    return np.dtype(np.uint16) if tokenizer.vocab_size <= 1 << 16 else np.dtype(np.uint32)


def cache_path(text, tokenizer, cache_dir):
    """cache_dir/tokens-<16 hex>.u16 (or .u32): the hex from sha256 of the text and the tokenizer."""
    digest = hashlib.sha256(CACHE_VERSION + b"\0")
    digest.update(to_metadata(tokenizer).encode("utf-8") + b"\0")
    digest.update(text.encode("utf-8"))
    suffix = "u16" if token_dtype(tokenizer) == np.uint16 else "u32"
    return os.path.join(cache_dir, f"tokens-{digest.hexdigest()[:16]}.{suffix}")


def token_ids(text, tokenizer, cache_dir):
    """The text's token ids (no BOS: one continuous stream, see the module docstring; a special token's
    text, '<s>' or '<|endoftext|>', is read as text like any other) as a read-only
    numpy.memmap, encoded once: a later call with the same text and tokenizer maps the cached file."""
    if not text:
        raise DataError("there is no text to tokenize")
    path = cache_path(text, tokenizer, cache_dir)
    dtype = token_dtype(tokenizer)
    if not (os.path.isfile(path) and os.path.getsize(path) and os.path.getsize(path) % dtype.itemsize == 0):
        os.makedirs(cache_dir, exist_ok=True)
        files.write_atomically(path, (ids.astype(dtype).tobytes() for ids in _encode_chunks(text, tokenizer)))
    return np.memmap(path, dtype=dtype, mode="r")


def _encode_chunks(text, tokenizer):
    """The ids of the text as a few arrays whose concatenation is the ids of the whole text."""
    if tokenizer.kind == "tokenizers":
        yield from _encode_at_clean_cuts(text, tokenizer)
        return
    if tokenizer.kind != "char" and not _newline_is_a_boundary(tokenizer):
        yield _checked(tokenizer.encode(text, special=False), tokenizer)
        return
    newline = tokenizer.encode("\n", special=False) if tokenizer.kind != "char" else []
    for k, chunk in enumerate(_line_chunks(text, CHUNK_CHARS)):
        if k == 0 or tokenizer.kind == "char":
            yield _checked(tokenizer.encode(chunk, special=False), tokenizer)
            continue
        ids = tokenizer.encode("\n" + chunk, special=False)
        if ids[:len(newline)] != newline:  # cannot happen when _newline_is_a_boundary holds
            raise DataError("the tokenizer encodes a newline differently in context; cannot chunk")
        yield _checked(ids[len(newline):], tokenizer)


def _encode_at_clean_cuts(text, tokenizer):
    """A tokenizer.json BPE's ids, chunk by chunk (see the module docstring): a chunk is encoded after
    the line before it, whose own ids are dropped from the front, and a cut is kept only where nothing
    joins across it: the line's ids alone begin the ids of the line and the next one together."""
    def encode(part):
        return tokenizer.encode(part, special=False)

    before, pending = "", ""  # the line before the text not yet encoded; that text
    for chunk in _line_chunks(text, CHUNK_CHARS):
        if pending:
            last_line = pending[pending.rfind("\n", 0, len(pending) - 1) + 1:]
            head = encode(last_line)
            if encode(last_line + chunk[:chunk.find("\n") + 1 or None])[:len(head)] == head:
                yield _checked(_ids_after(encode, before, pending), tokenizer)
                before, pending = last_line, ""
        pending += chunk
    if pending:
        yield _checked(_ids_after(encode, before, pending), tokenizer)


def _ids_after(encode, before, text):
    """The ids of text where it follows the line `before` ("" at the start of the whole text)."""
    return encode(before + text)[len(encode(before)):] if before else encode(text)


def _checked(ids, tokenizer):
    ids = np.asarray(ids, dtype=np.int64)
    if ids.size and not (0 <= ids.min() and ids.max() < tokenizer.vocab_size):
        raise DataError(f"the tokenizer gave an id outside its vocabulary (0..{tokenizer.vocab_size - 1})")
    return ids


def _line_chunks(text, size):
    """Pieces of about `size` characters that join to the text, each but the last ending in '\\n'
    (a line longer than `size` is one piece)."""
    start = 0
    while start < len(text):
        end = start + size
        if end < len(text):
            cut = text.rfind("\n", start, end)
            if cut < 0:
                cut = text.find("\n", end)
            end = len(text) if cut < 0 else cut + 1
        yield text[start:end]
        start = end


def _newline_is_a_boundary(tokenizer):
    """Whether nothing in a SentencePiece model can join the text on the two sides of a newline: no piece
    contains one, and normalization keeps it (see the module docstring)."""
    sp = sentencepiece.SentencePieceProcessor(model_proto=tokenizer.model_bytes)
    if any("\n" in sp.id_to_piece(i) for i in range(sp.get_piece_size())):
        return False
    probe = "a\nb \n\n c\n"
    return sp.decode(sp.encode(probe)) == probe


# ---- splits and batches ---------------------------------------------------------------------------------
def split(ids, val_fraction=0.1):
    """(train, val) views of ids: the first len - floor(len * f) tokens, then the rest. f = 0 gives an
    empty val (no validation). f is read as the decimal it prints as, so 100 tokens at 0.29 keep 29
    for validation (in binary floating point 100 * 0.29 is 28.999999999999996)."""
    if not 0 <= val_fraction < 1:
        raise DataError(f"the validation fraction must be in [0, 1), got {val_fraction}")
    n_val = int(len(ids) * fractions.Fraction(str(float(val_fraction))))
    n_train = len(ids) - n_val
    return ids[:n_train], ids[n_train:]


def check_long_enough(train, val, context):
    """Every split that is used (train always, val when not empty) must hold context + 1 tokens."""
    for ids, name, advice in ((train, "training", "more text"),
                              (val, "validation", "more text, a larger validation fraction")):
        if (name == "training" or len(ids)) and len(ids) < context + 1:
            raise DataError(f"the data has {len(ids)} {name} tokens, fewer than one context window "
                            f"(context + 1 = {context + 1}); use {advice} or a smaller {setting('context')}")


def random_batch(ids, batch_size, context, rng):
    """nanoGPT's get_batch: x (B, T) from B offsets drawn by `rng` (a numpy Generator, the only source
    of randomness, so its bit_generator.state resumes the data order exactly); y = x shifted by one.
    int64 host arrays."""
    if len(ids) < context + 1:
        raise DataError(f"{len(ids)} tokens cannot fill a window of context + 1 = {context + 1}")
    offsets = rng.integers(0, len(ids) - context, batch_size)
    positions = offsets[:, None] + np.arange(context)
    ids = np.asarray(ids)
    return ids[positions].astype(np.int64), ids[positions + 1].astype(np.int64)


def sequential_batch_count(n_ids, context, batch_size=1):
    """How many batches sequential_windows yields for n_ids ids."""
    windows = -(-max(n_ids - 1, 0) // context)
    return -(-windows // batch_size)


def sequential_windows(ids, context, batch_size=1):
    """Every prediction of ids exactly once, for evaluating a whole split: yields (x, y) int64 arrays
    (b, context) with b <= batch_size. Window i holds x = ids[iT : iT + T], y = ids[iT + 1 : iT + T + 1]
    (T = context), non-overlapping; the last window is padded to T with x = 0 and y = -100 (the loss's
    ignore index), so every one of the len(ids) - 1 tokens after the first is a target once. Weight each
    batch's mean loss by its count of targets other than -100."""
    n_targets = max(len(ids) - 1, 0)
    ids = np.asarray(ids)
    starts = range(0, n_targets, context)
    for first in range(0, len(starts), batch_size):
        rows = starts[first:first + batch_size]
        x = np.zeros((len(rows), context), dtype=np.int64)
        y = np.full((len(rows), context), -100, dtype=np.int64)
        for row, start in enumerate(rows):
            t = min(context, n_targets - start)
            x[row, :t] = ids[start:start + t]
            y[row, :t] = ids[start + 1:start + t + 1]
        yield x, y
