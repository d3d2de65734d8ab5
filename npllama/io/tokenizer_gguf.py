"""Tokenizers in GGUF metadata (llama.cpp's `tokenizer.*` keys), read and written.

GGUF stores a vocabulary as parallel arrays, not as a tokenizer file:
    tokenizer.ggml.model        "llama": SentencePiece BPE (Llama 1/2, TinyLlama, Mistral)
                                "gpt2":  byte-level BPE (Llama 3, SmolLM)
    tokenizer.ggml.tokens       [str]    every token's text (byte-level BPE: in GPT-2's byte-to-unicode alphabet)
    tokenizer.ggml.scores       [float]  "llama": the merge priority (a merge whose result scores higher goes first)
    tokenizer.ggml.token_type   [int]    1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte
    tokenizer.ggml.merges       [str]    "gpt2": "left right", highest priority first
    tokenizer.ggml.pre          str      "gpt2": which pre-tokenizer splits the text before the BPE
    tokenizer.ggml.{bos,eos,unknown,padding,eot,eom}_token_id, add_bos_token, add_eos_token,
    tokenizer.ggml.add_space_prefix, tokenizer.ggml.remove_extra_whitespaces, tokenizer.chat_template
Reading builds what npllama runs: a SentencePiece model for "llama" (its protobuf, written here: the
same tokenizer llama.cpp's SPM code emulates), a tokenizer.json for "gpt2". Writing goes the other
way. Values are plain Python (str, int, float, bool, lists of them); io/gguf_file.py moves them in and
out of the file.
"""
import json

import tokenizers

from . import bpe_json, sentencepiece_proto as proto
from .tokenizer import CharTokenizer, HFTokenizer, SentencePieceTokenizer, TokenizerError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # GGUF's and SentencePiece's numbering
PREFIX = "tokenizer.ggml."
STOP_KEYS = ("eot_token_id", "eom_token_id")  # end-of-turn ids llama.cpp stops on besides EOS
# llama.cpp (llama-vocab.cpp) also stops on tokens it knows by their text: end-of-turn ones (the first of
# which it takes as eot_token_id when the file names none), <|eom_id|>, and fill-in-the-middle's
# separators, which end a generation too
END_OF_TURN = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<EOT>", "_<EOT>",
               "<｜end▁of▁sentence｜>", "<end_of_utterance>")
END_OF_MESSAGE = "<|eom_id|>"
END_OF_GENERATION = END_OF_TURN + (END_OF_MESSAGE, "<|end_of_text|>", "<|return|>", "<|call|>", "<|fim_pad|>",
                                   "<fim_pad>", "<fim-pad>", "<PAD>", "<|repo_name|>", "<reponame>", "<REPO>",
                                   "<|file_sep|>", "<file_sep>", "<FILE_SEP>")

# llama.cpp's other names for the pre-tokenizers npllama writes (bpe_json.PRE_TOKENIZERS)
PRE_ALIASES = {"llama3": "llama-bpe", "llama-v3": "llama-bpe", "phi-2": "gpt-2", "starcoder": "smollm",
               "refact": "smollm", "codeshell": "smollm"}
# A text on which the pre-tokenizers above all split differently (as convert_hf_to_gguf tells them apart)
PRE_PROBE = "Hello World! it's 1234567 x2  \n\n \t🦙ÄÖ 日本 ''' ...\r\n3.14 I'LL  done"


def read(metadata):
    """The tokenizer a GGUF file's metadata describes, or None when it has none."""
    model = metadata.get(PREFIX + "model")
    if model is None:
        return None
    named = [metadata[PREFIX + key] for key in STOP_KEYS if PREFIX + key in metadata]
    by_text = [i for i, token in enumerate(metadata.get(PREFIX + "tokens", ())) if token in END_OF_GENERATION]
    conventions = {"chat_template": metadata.get("tokenizer.chat_template"), "eos_ids": named + by_text}
    if PREFIX + "add_bos_token" in metadata:
        conventions["add_bos"] = bool(metadata[PREFIX + "add_bos_token"])
    if model == "llama":
        return SentencePieceTokenizer(_sentencepiece_model(metadata), source="the GGUF tokenizer", **conventions)
    if model == "gpt2":
        return _byte_level_tokenizer(metadata, conventions)
    raise TokenizerError(f"the GGUF tokenizer model {model!r} is not supported (npllama reads 'llama' "
                         "SentencePiece and 'gpt2' byte-level BPE vocabularies)")


def fields(tokenizer):
    """The GGUF metadata (key -> value) of a tokenizer; TokenizerError for one llama.cpp cannot read."""
    if isinstance(tokenizer, CharTokenizer):
        raise TokenizerError("a character vocabulary has no GGUF form that llama.cpp reads: train with a "
                             "SentencePiece or BPE tokenizer (e.g. --tokenizer bpe:4096) to export to GGUF")
    if isinstance(tokenizer, SentencePieceTokenizer):
        vocabulary = _sentencepiece_fields(tokenizer)
    elif _is_byte_level(tokenizer):
        vocabulary = _byte_level_fields(tokenizer)
    else:
        vocabulary = _spm_style_fields(tokenizer)
    stops = {tokenizer.token_text(i): i for i in tokenizer.eos_ids if i != tokenizer.eos_id}
    eom = stops.pop(END_OF_MESSAGE, None)
    known = [stops[text] for text in END_OF_TURN if text in stops]
    ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
           "eot_token_id": (known or list(stops.values()) or [None])[0], "eom_token_id": eom}
    result = {**{PREFIX + key: value for key, value in {**vocabulary, **ids}.items() if value is not None},
              PREFIX + "add_bos_token": tokenizer.add_bos, PREFIX + "add_eos_token": False}
    if tokenizer.chat_template is not None:
        result["tokenizer.chat_template"] = tokenizer.chat_template
    return result


# ---- "llama": SentencePiece ---------------------------------------------------------------------------
def _sentencepiece_model(metadata):
    """A serialized SentencePiece ModelProto (BPE) with the GGUF vocabulary's pieces, scores and types."""
    tokens = metadata[PREFIX + "tokens"]
    scores = metadata.get(PREFIX + "scores") or [0.0] * len(tokens)
    types = metadata.get(PREFIX + "token_type") or [NORMAL] * len(tokens)
    if not len(tokens) == len(scores) == len(types):
        raise TokenizerError(f"the GGUF tokenizer has {len(tokens)} tokens, {len(scores)} scores and "
                             f"{len(types)} token types")
    special = {name: metadata.get(PREFIX + f"{key}_token_id") for name, key in
               (("unk", "unknown"), ("bos", "bos"), ("eos", "eos"), ("pad", "padding"))}
    trainer = proto.field(3, 2) + proto.field(4, len(tokens)) + proto.field(35, BYTE in types)  # BPE, byte fallback
    for number, (name, token_id) in enumerate(special.items()):
        valid = token_id is not None and 0 <= token_id < len(tokens)
        trainer += proto.field(40 + number, token_id if valid else -1)  # unk_id, bos_id, eos_id, pad_id
        if valid:
            trainer += proto.field(45 + number, tokens[token_id])  # the piece sentencepiece finds the id by
    normalizer = (proto.field(1, "identity")
                  + proto.field(proto.ADD_DUMMY_PREFIX, metadata.get(PREFIX + "add_space_prefix", True))
                  + proto.field(proto.REMOVE_EXTRA_WHITESPACES,
                                metadata.get(PREFIX + "remove_extra_whitespaces", False))
                  + proto.field(5, True))  # escape_whitespaces: ' ' -> '▁'
    pieces = b"".join(proto.field(proto.PIECES, proto.field(1, token) + proto.field(2, float(score))
                                  + proto.field(3, int(kind)))
                      for token, score, kind in zip(tokens, scores, types))
    return pieces + proto.field(proto.TRAINER, trainer) + proto.field(proto.NORMALIZER, normalizer)


def _sentencepiece_fields(tokenizer):
    table = proto.pieces(tokenizer.model_bytes)
    add_dummy_prefix, remove_extra_whitespaces = proto.normalizer_flags(tokenizer.model_bytes)
    return {"model": "llama", "tokens": [piece for piece, _, _ in table],
            "scores": [score for _, score, _ in table], "token_type": [kind for _, _, kind in table],
            "unknown_token_id": tokenizer.unk_id, "add_space_prefix": add_dummy_prefix,
            "remove_extra_whitespaces": remove_extra_whitespaces}


def _spm_style_fields(tokenizer):
    """A SentencePiece-style tokenizer.json (byte fallback, '▁' for spaces) as a "llama" vocabulary. A
    piece's score is minus the rank of the merge that makes it, so llama.cpp's highest-score-first
    merging follows the BPE's merge order."""
    data = json.loads(tokenizer.json)
    model = data["model"]
    rank = {}
    for index, merge in enumerate(model.get("merges", [])):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank.setdefault(left + right, index)
    added = {token["id"]: token for token in data.get("added_tokens", [])}
    tokens = _tokens_by_id(tokenizer)
    types = [CONTROL if added.get(i, {}).get("special") else USER_DEFINED if i in added
             else UNKNOWN if token == model.get("unk_token") else BYTE if _is_byte_piece(token) else NORMAL
             for i, token in enumerate(tokens)]
    unknown = [i for i, kind in enumerate(types) if kind == UNKNOWN]
    return {"model": "llama", "tokens": tokens, "scores": [-float(rank.get(token, 0)) for token in tokens],
            "token_type": types, "unknown_token_id": unknown[0] if unknown else None,
            "add_space_prefix": True, "remove_extra_whitespaces": False}


def _is_byte_piece(token):
    return len(token) == 6 and token.startswith("<0x") and token.endswith(">")


# ---- "gpt2": byte-level BPE ---------------------------------------------------------------------------
def _byte_level_tokenizer(metadata, conventions):
    """The tokenizer.json of a GGUF byte-level vocabulary: its tokens and merges, the pre-tokenizer
    `tokenizer.ggml.pre` names, control and user-defined tokens as added tokens matched in the text."""
    pre = metadata.get(PREFIX + "pre", "gpt-2")
    pre = PRE_ALIASES.get(pre, pre)
    if pre not in bpe_json.PRE_TOKENIZERS:
        raise TokenizerError(f"the GGUF pre-tokenizer {pre!r} is not supported (npllama knows "
                             f"{', '.join(bpe_json.PRE_TOKENIZERS)})")
    tokens = metadata[PREFIX + "tokens"]
    types = metadata.get(PREFIX + "token_type") or [NORMAL] * len(tokens)
    bos = metadata.get(PREFIX + "bos_token_id")
    add_bos = conventions.setdefault("add_bos", pre == "llama-bpe")  # llama.cpp's default for Llama 3
    added = [bpe_json.added_token(i, token, special=kind == CONTROL)
             for i, (token, kind) in enumerate(zip(tokens, types)) if kind in (CONTROL, USER_DEFINED)]
    text = bpe_json.byte_level_bpe({token: i for i, token in enumerate(tokens)},
                                   list(metadata.get(PREFIX + "merges", [])), added, pre,
                                   bos=(tokens[bos], bos) if add_bos and bos is not None else None,
                                   ignore_merges=pre == "llama-bpe")
    special_ids = {key: metadata.get(PREFIX + f"{key}_token_id") for key in ("bos", "eos")}
    names = {f"{key}_token": tokens[i] for key, i in special_ids.items() if i is not None and 0 <= i < len(tokens)}
    return HFTokenizer(text, source="the GGUF tokenizer", **names, **conventions)


def _is_byte_level(tokenizer):
    return "ByteLevel" in json.dumps(json.loads(tokenizer.json).get("pre_tokenizer"))


def _byte_level_fields(tokenizer):
    data = json.loads(tokenizer.json)
    added = {token["id"]: token for token in data.get("added_tokens", [])}
    tokens = _tokens_by_id(tokenizer)
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in data["model"].get("merges", [])]
    return {"model": "gpt2", "pre": _pre_name(data.get("pre_tokenizer")), "tokens": tokens, "merges": merges,
            "token_type": [(CONTROL if added[i].get("special") else USER_DEFINED) if i in added else NORMAL
                           for i in range(len(tokens))]}


def _pre_name(pre_tokenizer):
    """The llama.cpp name of the pre-tokenizer that splits PRE_PROBE as this one does."""
    def split(document):
        return tokenizers.Tokenizer.from_str(json.dumps({
            "version": "1.0", "pre_tokenizer": document,
            "model": {"type": "BPE", "vocab": {}, "merges": []}})).pre_tokenizer.pre_tokenize_str(PRE_PROBE)
    ours = split(pre_tokenizer)
    for name, document in bpe_json.PRE_TOKENIZERS.items():
        if split(document) == ours:
            return name
    raise TokenizerError("this tokenizer's pre-tokenizer is not one llama.cpp knows by name (npllama writes "
                         f"{', '.join(bpe_json.PRE_TOKENIZERS)}): it cannot be exported to GGUF")


def _tokens_by_id(tokenizer):
    vocabulary = json.loads(tokenizer.json)
    by_id = {i: token for token, i in vocabulary["model"]["vocab"].items()}
    by_id.update((token["id"], token["content"]) for token in vocabulary.get("added_tokens", []))
    if sorted(by_id) != list(range(len(by_id))):
        raise TokenizerError("the tokenizer's ids are not 0..N-1 without gaps: GGUF cannot number them")
    return [by_id[i] for i in range(len(by_id))]
