"""Tokenizers: SentencePiece (Llama 1/2's own), HF `tokenizer.json` BPE (Llama 3, SmolLM, TinyLlama,
Mistral: through the `tokenizers` library) and characters (nanoGPT's shakespeare_char).

All turn text into a list of ids and back, behind one interface: `encode(text, bos, eos)`,
`decode(ids)`, `vocab_size`, `bos_id`/`eos_id` (None when absent), `kind`, `describe()` and
`stream_decoder()`; and the model's conventions around them (Tokenizer):
    add_bos        whether the model's text begins with BOS (Llama 2 yes; many BPE models add none)
    eos_ids        the ids that end generation (Llama 3: <|end_of_text|>, <|eom_id|> and <|eot_id|>)
    chat_template  the model's Jinja chat template (chat_template.py), None for a base model
    apply_chat_template(messages, add_generation_prompt=True)   the conversation's ids
Special tokens written in text (`<|im_start|>`, `<|eot_id|>`, a template's `<s>`) encode as their ids.

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
import os
import re

import sentencepiece
import tokenizers

from ..errors import TokenizerError
from . import bpe_json, chat_template as chat_templates, sentencepiece_proto, tiktoken_ranks

REPLACEMENT_CHARACTER = "\ufffd"  # what sentencepiece prints for a byte that forms no character


def _check_ids(ids, vocab_size):
    """The ids as Python ints; an id outside the vocabulary is an error, not an IndexError."""
    ids = [int(i) for i in ids]
    for i in ids:
        if not 0 <= i < vocab_size:
            raise TokenizerError(f"token id {i} is outside the vocabulary (0..{vocab_size - 1})")
    return ids


def check_text(text):
    """A text is Unicode characters: a lone surrogate (what Python makes of bytes that are not UTF-8 in
    command-line arguments and some streams) is not one."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise TokenizerError(f"the text is not valid UTF-8: {text[error.start]!r} at offset {error.start} "
                             "is a byte that forms no character") from None


def _add_specials(tokenizer, ids, bos, eos):
    for wanted, name in ((bos, "bos"), (eos, "eos")):
        if wanted and getattr(tokenizer, f"{name}_id") is None:
            raise TokenizerError(f"this tokenizer ({tokenizer.describe()}) has no {name.upper()} token")
    return [tokenizer.bos_id] * bool(bos) + ids + [tokenizer.eos_id] * bool(eos)


class Tokenizer:
    """The conventions every tokenizer carries beside its vocabulary (see the module docstring).

    Subclasses set bos_id, eos_id and vocab_size, then call _set_conventions."""
    kind = None
    bos_id = eos_id = None

    def _set_conventions(self, add_bos=None, eos_ids=(), chat_template=None):
        """add_bos None: the tokenizer's own default; eos_ids: stop ids besides EOS."""
        self.add_bos = bool(self._default_add_bos() if add_bos is None else add_bos) and self.bos_id is not None
        stops = [i for i in [self.eos_id, *eos_ids] if i is not None]
        self.eos_ids = tuple(dict.fromkeys(_check_ids(stops, self.vocab_size)))
        self.chat_template = chat_template or None

    def _default_add_bos(self):
        return self.bos_id is not None

    def conventions(self):
        """What _set_conventions takes, as JSON-able values (for the weights file's metadata)."""
        return {"add_bos": self.add_bos, "eos_ids": list(self.eos_ids), "chat_template": self.chat_template}

    def token_text(self, token_id):
        """The text a special token is written as in a prompt (e.g. '<s>', '<|eot_id|>')."""
        raise NotImplementedError

    def uncovered(self, text):
        """The characters of the text that encode as the unknown token (none for byte fallback or
        byte-level BPE, which spell any character in bytes)."""
        raise NotImplementedError

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True, **variables):
        """The conversation rendered by the model's template: its ids (tokenize) or its text. Like
        transformers, the template writes BOS itself (so none is added) and sees bos_token/eos_token."""
        if self.chat_template is None:
            raise TokenizerError("this model has no chat template (a base model: use generate, not chat)")
        specials = {f"{name}_token": self.token_text(token_id)
                    for name, token_id in (("bos", self.bos_id), ("eos", self.eos_id)) if token_id is not None}
        text = chat_templates.render(self.chat_template, messages, add_generation_prompt, **{**specials, **variables})
        return self.encode(text) if tokenize else text


SPLIT_PIECE_TYPES = (2, 3, 4)  # unknown, control and user-defined pieces: matched whole in a text first


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model, e.g. Llama 1/2's 32000 pieces, built from the model file's bytes."""
    kind = "sentencepiece"

    def __init__(self, model_bytes, source="the data", legacy=True, **conventions):
        self.model_bytes = bytes(model_bytes)
        self.legacy = bool(legacy)
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
        self.unk_id = self._sp.unk_id() if self._sp.unk_id() >= 0 else None
        self._anchor_id, self._anchor_text = self._find_anchor()
        self._specials = _special_pattern({piece: i for i, (piece, _, kind) in
                                           enumerate(sentencepiece_proto.pieces(self.model_bytes))
                                           if kind in SPLIT_PIECE_TYPES and piece})
        self._mid_text_sp = None  # made when first needed: the model without the dummy prefix
        self._set_conventions(**conventions)

    @classmethod
    def from_file(cls, path, **conventions):
        return cls(_read_bytes(path), source=str(path), **conventions)

    def describe(self):
        return f"SentencePiece, {self.vocab_size} pieces"

    def token_text(self, token_id):
        return self._sp.id_to_piece(token_id)

    def uncovered(self, text):
        if any(self._sp.is_byte(i) for i in range(self.vocab_size)):
            return set()
        return {c for c in set(text) if self.unk_id in self._sp.encode(c)}  # normalization may map it

    def conventions(self):
        return {**super().conventions(), "legacy": self.legacy}

    def encode(self, text, bos=False, eos=False, special=True):
        """sentencepiece's ids. With `special`, the text of a control piece ('<s>', '</s>', as chat
        templates write them), of '<unk>' or of a user-defined piece is that piece's id (as llama.cpp
        and HF's added tokens match them), and the text after it is encoded as `legacy` says: as a text
        of its own, with the dummy-prefix '▁' (sentencepiece's, Meta's and llama.cpp's way, HF's
        legacy=True), or as the continuation it is (HF's legacy=False)."""
        check_text(text)
        pieces = _split_on(text, self._specials) if special else [(None, text)]
        ids = []
        for index, (special_id, segment) in enumerate(pieces):
            ids += [special_id] * (special_id is not None)
            if segment:
                ids += self._sp.encode(segment) if index == 0 or self.legacy else self._mid_text(segment)
        return _add_specials(self, ids, bos, eos)

    def _mid_text(self, text):
        """text's ids without the '▁' that begins a text: the same model, with add_dummy_prefix off."""
        if self._mid_text_sp is None:
            self._mid_text_sp = sentencepiece.SentencePieceProcessor(
                model_proto=sentencepiece_proto.without_dummy_prefix(self.model_bytes))
        return self._mid_text_sp.encode(text)

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


class CharTokenizer(Tokenizer):
    """One id per character of a fixed alphabet, in the given order; no BOS/EOS, no chat template."""
    kind = "char"

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
        self._set_conventions()

    @classmethod
    def from_text(cls, text):
        """The sorted set of the text's characters (as nanoGPT's shakespeare_char)."""
        return cls(sorted(set(text)))

    def describe(self):
        return f"characters, {self.vocab_size} symbols"

    def encode(self, text, bos=False, eos=False, special=True):
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

    def uncovered(self, text):
        return set(text) - set(self.chars)


class _CharStream:
    """Every character id is its own text: nothing is ever held back."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def push(self, token_id):
        return self._tokenizer.decode([token_id])

    def flush(self):
        return ""


class HFTokenizer(Tokenizer):
    """An HF `tokenizer.json` BPE, run by the `tokenizers` library (as transformers' fast tokenizers):
    byte-level (Llama 3, SmolLM, GPT-2: every byte is a symbol, so no text is unknown) or
    SentencePiece-style with byte fallback (TinyLlama, Mistral). Its added special tokens are matched
    in the text before the BPE runs. bos_token/eos_token name the model's BOS/EOS (tokenizer_config.json
    names them; without one, BOS is what the file's post-processor puts first)."""
    kind = "tokenizers"

    def __init__(self, text, source="the data", bos_token=None, eos_token=None, **conventions):
        self.json = text
        document = _tokenizer_document(text, source)
        self._tokenizer = _tokenizers_bpe(text, source)
        self._byte_level, self._unknown = _is_byte_level(document), document["model"].get("unk_token")
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        self._byte_pieces, self._special_ids = _byte_pieces(document), _special_ids(document)
        self._added_bos = self._ids_added_before("x")
        self.bos_id = self.token_id(bos_token, source) if bos_token else (self._added_bos or [None])[0]
        self.eos_id = self.token_id(eos_token, source) if eos_token else None
        self._set_conventions(**conventions)

    def _ids_added_before(self, text):
        """The ids the file's post-processor puts before a text (e.g. [<|begin_of_text|>] or [])."""
        plain = self._tokenizer.encode(text, add_special_tokens=False).ids
        full = self._tokenizer.encode(text, add_special_tokens=True).ids
        return full[:len(full) - len(plain)] if full[len(full) - len(plain):] == plain else []

    def _default_add_bos(self):
        return self.bos_id is not None and self._added_bos == [self.bos_id]

    def token_id(self, token, source="the tokenizer"):
        """The id of a token's text (e.g. '<|eot_id|>')."""
        token_id = self._tokenizer.token_to_id(token)
        if token_id is None:
            raise TokenizerError(f"{source}: the special token {token!r} is not in the vocabulary")
        return token_id

    def settings(self):
        """The special tokens' texts and the conventions (what __init__ takes besides the JSON)."""
        return {"bos_token": self.token_text(self.bos_id) if self.bos_id is not None else None,
                "eos_token": self.token_text(self.eos_id) if self.eos_id is not None else None,
                **self.conventions()}

    def describe(self):
        return f"{'byte-level ' if self._byte_level else ''}BPE (tokenizer.json), {self.vocab_size} tokens"

    def token_text(self, token_id):
        return self._tokenizer.id_to_token(token_id)

    def uncovered(self, text):
        if self._byte_level or self._byte_pieces or self._unknown is None:
            return set()
        unknown = self._tokenizer.token_to_id(self._unknown)
        return {c for c in set(text) if unknown in self.encode(c)}

    def encode(self, text, bos=False, eos=False, special=True):
        """The ids of the text; with `special`, an added token's text in it is that token's id."""
        check_text(text)
        self._tokenizer.encode_special_tokens = not special  # the library's switch: specials as plain text
        try:
            ids = self._tokenizer.encode(text, add_special_tokens=False).ids
        finally:
            self._tokenizer.encode_special_tokens = False
        return _add_specials(self, ids, bos, eos)

    def decode(self, ids):
        """The text of the ids; special tokens (BOS, <|eot_id|>, ...) print nothing, as control pieces
        do in SentencePiece."""
        return self._tokenizer.decode(_check_ids(ids, self.vocab_size), skip_special_tokens=True)

    def stream_decoder(self):
        return _WindowStream(self)

    def _may_change_with_more(self, ids):
        """Whether ids to come may change the text of these: when the last that prints is a byte piece
        of a byte-fallback BPE, since its decoder prints a run of bytes that is not UTF-8 as one
        U+FFFD per byte of the run (special tokens between them print nothing, so do not end it)."""
        printing = [i for i in ids if i not in self._special_ids]
        return bool(printing) and printing[-1] in self._byte_pieces


def _byte_pieces(document):
    """The ids of a byte-fallback BPE's byte pieces <0x00>..<0xFF> (none for a byte-level BPE)."""
    model = document["model"]
    if not model.get("byte_fallback"):
        return frozenset()
    return frozenset(i for token, i in model["vocab"].items()
                     if len(token) == 6 and token.startswith("<0x") and token.endswith(">"))


def _special_ids(document):
    return frozenset(token["id"] for token in document.get("added_tokens", []) if token.get("special"))


def _tokenizer_document(text, source):
    """A tokenizer.json's JSON (TokenizerError when it is not one)."""
    try:
        document = json.loads(text)
    except ValueError:
        document = None
    if not isinstance(document, dict) or not isinstance(document.get("model"), dict):
        raise TokenizerError(f"{source} is not a tokenizer.json (HF tokenizers' JSON)")
    return document


def _tokenizers_bpe(text, source):
    """The tokenizers library's Tokenizer of a tokenizer.json; only BPE models are taken."""
    try:
        tokenizer = tokenizers.Tokenizer.from_str(text)
    except Exception as error:  # the library raises bare Exceptions for malformed files
        raise TokenizerError(f"{source}: the tokenizers library cannot read it: {_first_line(error)}") from None
    kind = type(tokenizer.model).__name__  # (older files leave the model's "type" out)
    if kind != "BPE":
        raise TokenizerError(f"{source}: a {kind} tokenizer.json is not supported (npllama reads BPE "
                             "tokenizers: byte-level as Llama 3's, or SentencePiece-style as TinyLlama's)")
    return tokenizer


def _is_byte_level(document):
    """Whether a tokenizer.json spells bytes as characters (GPT-2's ByteLevel) rather than '▁' and <0xNN>."""
    return "ByteLevel" in json.dumps([document.get("pre_tokenizer"), document.get("decoder")])


class _WindowStream:
    """Streaming decode by decoding a short window twice (as HF's text-generation-inference does).

    The window runs from `start`; its first `held` ids have been printed already. For each new id:
        before = decode(window[:held]),  after = decode(window)
    and if `after` does not end in U+FFFD (bytes of an unfinished character), nor in a byte piece of a
    byte-fallback BPE (whose run of bytes the next id may still make invalid), what it adds to `before`
    is printed, and the window moves on to begin at the old `held`. Both texts start at the same id,
    so whatever a decoder does at a text's start (e.g. dropping the first space) cancels out, and a
    window only moves past text that is complete: the pieces printed add up to decode(all ids)."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self._ids = []
        self._start = self._held = 0

    def push(self, token_id):
        self._ids += _check_ids([token_id], self._tokenizer.vocab_size)
        before = self._tokenizer.decode(self._ids[self._start:self._held])
        after = self._tokenizer.decode(self._ids[self._start:])
        if (after.endswith(REPLACEMENT_CHARACTER) or len(after) <= len(before)
                or self._tokenizer._may_change_with_more(self._ids[self._start:])):
            return ""
        self._start, self._held = self._held, len(self._ids)
        return after[len(before):]

    def flush(self):
        before = self._tokenizer.decode(self._ids[self._start:self._held])
        rest = self._tokenizer.decode(self._ids[self._start:])[len(before):]
        self._ids, self._start, self._held = [], 0, 0
        return rest


def _special_pattern(specials):
    """(compiled alternation of the special texts, longest first; text -> id), or None for none."""
    if not specials:
        return None
    alternatives = sorted(specials, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, alternatives))), specials


def _split_on(text, specials):
    """[(None, text before the first special), (special id, the text after it up to the next), ...]:
    the leftmost special text wins, and of those starting there the longest."""
    if specials is None:
        return [(None, text)]
    pattern, ids = specials
    pieces, special, position = [], None, 0
    for match in pattern.finditer(text):
        pieces.append((special, text[position:match.start()]))
        special, position = ids[match.group()], match.end()
    return pieces + [(special, text[position:])]


def _read_bytes(path):
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as error:
        raise TokenizerError(f"cannot read tokenizer {path}: {error.strerror}") from None


def _first_line(error):
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# ---- embedding in a weights file's metadata (str -> str) ----------------------------------------------
CONVENTIONS = ("add_bos", "eos_ids", "chat_template")


def to_metadata(tokenizer):
    """A JSON string that from_metadata turns back into the same tokenizer."""
    if tokenizer.kind == "char":
        return json.dumps({"type": "char", "chars": tokenizer.chars}, ensure_ascii=False)
    if tokenizer.kind == "tokenizers":
        return json.dumps({"type": "tokenizers", "json": tokenizer.json, **tokenizer.settings()}, ensure_ascii=False)
    model = base64.b64encode(tokenizer.model_bytes).decode("ascii")
    return json.dumps({"type": "sentencepiece", "model": model, **tokenizer.conventions()}, ensure_ascii=False)


def from_metadata(text):
    try:
        data = json.loads(text)
    except (TypeError, ValueError) as error:
        raise TokenizerError(f"tokenizer metadata is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        data = {}
    kind = data.get("type")
    if kind == "char" and isinstance(data.get("chars"), str):
        return CharTokenizer(data["chars"])
    conventions = {name: data[name] for name in CONVENTIONS if data.get(name) is not None}
    if kind == "sentencepiece" and isinstance(data.get("model"), str):
        conventions["legacy"] = data.get("legacy", True)
        try:
            model_bytes = base64.b64decode(data["model"], validate=True)
        except binascii.Error as error:
            raise TokenizerError(f"tokenizer metadata: the model is not valid base64: {error}") from None
        return SentencePieceTokenizer(model_bytes, source="the embedded tokenizer", **conventions)
    if kind == "tokenizers" and isinstance(data.get("json"), str):
        return HFTokenizer(data["json"], source="the embedded tokenizer", bos_token=data.get("bos_token"),
                           eos_token=data.get("eos_token"), **conventions)
    raise TokenizerError('tokenizer metadata must be {"type": "char", "chars": ...}, '
                         '{"type": "sentencepiece", "model": ...} or {"type": "tokenizers", "json": ...}')


CODE_LLAMA = "CodeLlamaTokenizer"  # (transformers 5 runs it as the Llama class, legacy always off)
LLAMA_CLASSES = ("LlamaTokenizer", "LlamaTokenizerFast", CODE_LLAMA, CODE_LLAMA + "Fast")


def load(path, tokenizer_class=None, legacy=None, add_prefix_space=True, **settings):
    """A tokenizer from its file: an HF tokenizer.json, a SentencePiece .model, or Meta's Llama 3
    tokenizer.model (a tiktoken rank file, turned into the equivalent tokenizer.json BPE). settings:
    the conventions (add_bos, eos_ids, chat_template) and, for tokenizer.json, bos_token/eos_token.
    tokenizer_class, legacy and add_prefix_space are tokenizer_config.json's: a SentencePiece-style
    tokenizer.json of transformers' Llama class is run as that class runs it (bpe_json.as_transformers_llama),
    legacy (default: sentencepiece's own way, except for that class in transformers 5) as
    SentencePieceTokenizer takes it."""
    path = os.fspath(path)
    data = _read_bytes(path)
    llama_class = tokenizer_class in LLAMA_CLASSES
    if llama_class and (legacy is None or tokenizer_class.startswith(CODE_LLAMA)):
        legacy = False  # transformers 5's default, and all CodeLlama knows
    if path.endswith(".json") or data.lstrip()[:1] == b"{":
        text = data.decode("utf-8", "replace")
        if llama_class:
            text = _as_llama_class(text, legacy, add_prefix_space)
        return HFTokenizer(text, source=str(path), **settings)
    if tiktoken_ranks.is_rank_file(data):
        return _llama3_tokenizer(data, path, settings)
    settings = {name: value for name, value in settings.items() if name in CONVENTIONS}
    legacy = True if legacy is None else legacy  # sentencepiece's own way
    return SentencePieceTokenizer(data, source=str(path), legacy=legacy, **settings)


def _as_llama_class(text, legacy, add_prefix_space):
    """A SentencePiece-style tokenizer.json as transformers' Llama class runs it; a byte-level one (some
    Hub repositories name the class wrongly; transformers then ignores it too), or one that is not a
    tokenizer.json (HFTokenizer says what is wrong), as it is."""
    try:
        document = json.loads(text)
    except ValueError:
        return text
    if not isinstance(document, dict) or not isinstance(document.get("model"), dict) or _is_byte_level(document):
        return text
    return bpe_json.as_transformers_llama(document, bool(legacy), add_prefix_space)


def _llama3_tokenizer(data, path, settings):
    """Meta's Llama 3 tokenizer.model; without a stop set of its own (Meta's directories have no
    generation_config.json) it stops where Llama 3's chat does, at <|eom_id|> and <|eot_id|> too."""
    tokenizer = HFTokenizer(tiktoken_ranks.to_tokenizer_json(data, path), source=path,
                            **{"bos_token": tiktoken_ranks.BOS, "eos_token": tiktoken_ranks.EOS, **settings})
    if "eos_ids" not in settings:
        tokenizer.eos_ids += tuple(tokenizer.token_id(text) for text in tiktoken_ranks.END_OF_TURN)
    return tokenizer
