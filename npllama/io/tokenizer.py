"""Tokenizers: SentencePiece (the Llama models' own) and characters (nanoGPT's shakespeare_char).

Both turn text into a list of ids and back, behind one small interface: `encode(text, bos, eos)`,
`decode(ids)`, `vocab_size`, `bos_id`/`eos_id` (None when absent), `kind`, `describe()` and
`stream_decoder()`.

- SentencePieceTokenizer wraps the `sentencepiece` library around a serialized model (the bytes of a
  tokenizer.model file, kept in `model_bytes` so a weights file can embed them). A piece is a word or
  sub-word in which '▁' marks a space; encoding adds a '▁' before the text, and decoding drops the space
  of the piece that begins the text. Text the vocabulary lacks is spelled as byte pieces
  <0x00>..<0xFF>, one per UTF-8 byte, and only a run of them together makes the character.
- CharTokenizer gives each character of a fixed alphabet its own id; it has no BOS/EOS.

Streaming decode. Generation prints text one token at a time, but a token's text is not always
decidable on its own: the bytes of '€' (<0xE2><0x82><0xAC>) print U+FFFD until the last one arrives,
the space of a leading '▁' depends on whether any text came before, and BOS/EOS print nothing.
Re-decoding the whole history at every token would be right but quadratic. `stream_decoder()` instead
re-decodes a short window of recent ids and returns what the window's text gained since the previous
token, holding back a trailing U+FFFD that more bytes may still turn into a character. The window
starts afresh wherever nothing before can change the text after (see _SentencePieceStream).
"""
import base64
import binascii
import json

import sentencepiece

from ..errors import UserError

REPLACEMENT_CHARACTER = "\ufffd"  # what sentencepiece prints for a byte that forms no character


class TokenizerError(UserError):
    """A tokenizer, text or id that cannot be used (message is one line, fit for the user)."""


def _check_ids(ids, vocab_size):
    """The ids as Python ints; an id outside the vocabulary is an error, not an IndexError."""
    ids = [int(i) for i in ids]
    for i in ids:
        if not 0 <= i < vocab_size:
            raise TokenizerError(f"token id {i} is outside the vocabulary (0..{vocab_size - 1})")
    return ids


def _add_specials(tokenizer, ids, bos, eos):
    for wanted, name in ((bos, "bos"), (eos, "eos")):
        if wanted and getattr(tokenizer, f"{name}_id") is None:
            raise TokenizerError(f"this tokenizer ({tokenizer.describe()}) has no {name.upper()} token")
    return [tokenizer.bos_id] * bool(bos) + ids + [tokenizer.eos_id] * bool(eos)


class SentencePieceTokenizer:
    """A SentencePiece model, e.g. Llama 1/2's 32000 pieces, built from the model file's bytes."""
    kind = "sentencepiece"

    def __init__(self, model_bytes, source="the data"):
        self.model_bytes = bytes(model_bytes)
        if not self.model_bytes:
            raise TokenizerError(f"{source} is not a SentencePiece model: it is empty")
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_proto=self.model_bytes)
        except RuntimeError as error:
            reason = str(error).strip().splitlines()[0]
            raise TokenizerError(f"{source} is not a SentencePiece model: {reason}") from None
        self.vocab_size = self._sp.get_piece_size()
        self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        self.eos_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else None
        self._anchor_id, self._anchor_text = self._find_anchor()

    @classmethod
    def from_file(cls, path):
        try:
            with open(path, "rb") as file:
                data = file.read()
        except OSError as error:
            raise TokenizerError(f"cannot read tokenizer {path}: {error.strerror}") from None
        return cls(data, source=str(path))

    def describe(self):
        return f"SentencePiece, {self.vocab_size} pieces"

    def encode(self, text, bos=False, eos=False):
        return _add_specials(self, self._sp.encode(text), bos, eos)

    def decode(self, ids):
        return self._sp.decode(_check_ids(ids, self.vocab_size))

    def stream_decoder(self):
        return _SentencePieceStream(self)

    # ---- what the stream decoder needs to know about pieces -----------------------------------------
    def _byte_value(self, token_id):
        """0..255 for a byte piece '<0xNN>', None for any other piece."""
        return int(self._sp.id_to_piece(token_id)[3:5], 16) if self._sp.is_byte(token_id) else None

    def _is_control(self, token_id):
        return self._sp.is_control(token_id)

    def _find_anchor(self):
        """An ordinary piece that prints text on its own: decoding it first puts what follows mid-text."""
        sp = self._sp
        for i in range(self.vocab_size):
            if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i)):
                text = sp.decode([i])
                if text:
                    return i, text
        raise TokenizerError("the SentencePiece model has no ordinary piece that prints text")

    def _decode_window(self, ids, mid_text):
        """The text of `ids`, read as the start of a text or (mid_text) after some earlier text."""
        if not mid_text:
            return self._sp.decode(ids)
        return self._sp.decode([self._anchor_id] + ids)[len(self._anchor_text):]


class _SentencePieceStream:
    """Streaming decode for SentencePiece: push() returns what each id adds to decode(ids so far).

    sentencepiece's decode concatenates per-piece texts: a control piece prints '', a maximal run of
    byte pieces prints its UTF-8 characters (one U+FFFD per byte that forms none), any other piece
    prints itself with '▁' -> ' ', except that the piece beginning the text drops one leading '▁'.
    (Llama models have no denormalizer, the one step that would act across pieces.) Hence:
    - once some text is out, the ids after it decode on their own if read mid-text (after an anchor);
    - an id can change the text of the ids before it only if it is a continuation byte (0x80-0xBF)
      with a lead byte (>= 0xC0) among the last three ids. Before any other id the window is cut: its
      text is final, the rest is emitted, and a new window begins. Once text is out a window holds at
      most four ids (a lead byte and three continuations); before, only ids that print nothing, which
      for Llama is at most one '▁' (control ids are never kept: they print nothing, only end a run);
    - within a window, trailing U+FFFDs after a byte may still become a character, so they wait.
    """

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self._reset(mid_text=False)

    def _reset(self, mid_text):
        self._window = []           # ids since the last cut
        self._mid_text = mid_text   # whether text came before the window (it decodes as a continuation)
        self._text = ""             # the window's text so far
        self._emitted = 0           # how much of _text push() has returned

    def push(self, token_id):
        """The text this id completes ('' while it is held back)."""
        token_id, = _check_ids([token_id], self._tokenizer.vocab_size)
        text_came = self._mid_text or self._text  # only then can the window be cut off
        out = ""
        if text_came and not self._may_join_window(token_id):
            out = self._rest_of_window()
            self._reset(mid_text=True)
        if self._tokenizer._is_control(token_id):
            return out  # prints nothing; a cut above already ended any run of bytes
        self._window.append(token_id)
        self._text = self._tokenizer._decode_window(self._window, self._mid_text)
        final = self._text
        if self._tokenizer._byte_value(token_id) is not None:
            final = final.rstrip(REPLACEMENT_CHARACTER)  # more bytes may make these a character
        new = final[self._emitted:]
        self._emitted += len(new)
        return out + new

    def flush(self):
        """Whatever is still held back (bytes that never formed a character print U+FFFD)."""
        out = self._rest_of_window()
        self._reset(mid_text=False)
        return out

    def _may_join_window(self, token_id):
        value = self._tokenizer._byte_value(token_id)
        if value is None or not 0x80 <= value < 0xC0:
            return False
        recent = (self._tokenizer._byte_value(i) for i in self._window[-3:])
        return any(b is not None and b >= 0xC0 for b in recent)

    def _rest_of_window(self):
        return self._text[self._emitted:]


class CharTokenizer:
    """One id per character of a fixed alphabet, in the given order; no BOS/EOS."""
    kind = "char"
    bos_id = None
    eos_id = None

    def __init__(self, chars):
        chars = list(chars)
        if not chars:
            raise TokenizerError("a character vocabulary needs at least one character")
        for c in chars:
            if not isinstance(c, str) or len(c) != 1:
                raise TokenizerError(f"a character vocabulary holds single characters, got {c!r}")
        self.chars = "".join(chars)
        self._ids = {c: i for i, c in enumerate(self.chars)}
        if len(self._ids) != len(self.chars):
            duplicate = next(c for i, c in enumerate(self.chars) if self._ids[c] != i)
            raise TokenizerError(f"character {duplicate!r} appears twice in the vocabulary")
        self.vocab_size = len(self.chars)

    @classmethod
    def from_text(cls, text):
        """The sorted set of the text's characters (as nanoGPT's shakespeare_char)."""
        return cls(sorted(set(text)))

    def describe(self):
        return f"characters, {self.vocab_size} symbols"

    def encode(self, text, bos=False, eos=False):
        try:
            ids = [self._ids[c] for c in text]
        except KeyError as error:
            char = error.args[0]
            raise TokenizerError(f"character {char!r} at offset {text.index(char)} is not in the "
                                 f"{self.vocab_size}-character vocabulary") from None
        return _add_specials(self, ids, bos, eos)

    def decode(self, ids):
        return "".join(self.chars[i] for i in _check_ids(ids, self.vocab_size))

    def stream_decoder(self):
        return _CharStream(self)


class _CharStream:
    """Every character id is its own text: nothing is ever held back."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def push(self, token_id):
        return self._tokenizer.decode([token_id])

    def flush(self):
        return ""


# ---- embedding in a weights file's metadata (str -> str) ----------------------------------------------
def to_metadata(tokenizer):
    """A JSON string that from_metadata turns back into the same tokenizer."""
    if tokenizer.kind == "char":
        return json.dumps({"type": "char", "chars": tokenizer.chars}, ensure_ascii=False)
    model = base64.b64encode(tokenizer.model_bytes).decode("ascii")
    return json.dumps({"type": "sentencepiece", "model": model})


def from_metadata(text):
    try:
        data = json.loads(text)
    except (TypeError, ValueError) as error:
        raise TokenizerError(f"tokenizer metadata is not valid JSON: {error}") from None
    kind = data.get("type") if isinstance(data, dict) else None
    if kind == "char" and isinstance(data.get("chars"), str):
        return CharTokenizer(data["chars"])
    if kind == "sentencepiece" and isinstance(data.get("model"), str):
        try:
            model_bytes = base64.b64decode(data["model"], validate=True)
        except binascii.Error as error:
            raise TokenizerError(f"tokenizer metadata: the model is not valid base64: {error}") from None
        return SentencePieceTokenizer(model_bytes, source="the embedded tokenizer")
    raise TokenizerError('tokenizer metadata must be {"type": "char", "chars": ...} or '
                         '{"type": "sentencepiece", "model": ...}')


def load(path):
    """A SentencePiece tokenizer from a .model file (e.g. an HF checkpoint's tokenizer.model)."""
    return SentencePieceTokenizer.from_file(path)
