"""Writing HF tokenizer.json files for byte-level BPE vocabularies that come without one (Meta's Llama 3
rank file, a GGUF "gpt2" vocabulary), laid out as HF's own Llama 3 and GPT-2 files are.

The pre-tokenizers, by llama.cpp's name for them (`tokenizer.ggml.pre`):
    llama-bpe   Llama 3: Meta's regex (contractions, words with one leading non-letter, numbers of at
                most 3 digits, punctuation runs, whitespace runs), then bytes as GPT-2's characters
    gpt-2       GPT-2's regex and byte characters (HF's ByteLevel with its own regex)
    smollm      every digit alone, then GPT-2's
"""
import json

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
GPT2_SPLIT = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
PRE_TOKENIZERS = {
    "llama-bpe": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": LLAMA3_PATTERN}, "behavior": "Isolated", "invert": False},
        {**GPT2_SPLIT, "use_regex": False}]},
    "gpt-2": GPT2_SPLIT,
    "smollm": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, GPT2_SPLIT]},
}


def added_token(token_id, text, special=True):
    """An added token: matched whole in the text before the BPE runs (special: skipped when decoding)."""
    return {"id": token_id, "content": text, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": special}


def byte_level_bpe(vocab, merges, added_tokens, pre_tokenizer, bos=None, ignore_merges=False):
    """The tokenizer.json text. vocab: byte-level token -> id; merges: ["left right", ...], first first;
    bos: (text, id) that the post-processor puts before every text, or None."""
    document = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added_tokens,
        "normalizer": None, "pre_tokenizer": PRE_TOKENIZERS[pre_tokenizer],
        "post_processor": _bos_template(*bos) if bos is not None else None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": ignore_merges, "vocab": vocab, "merges": merges}}
    return json.dumps(document, ensure_ascii=False)


def _bos_template(text, token_id):
    bos = {"SpecialToken": {"id": text, "type_id": 0}}
    return {"type": "TemplateProcessing",
            "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": text, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {text: {"id": text, "ids": [token_id], "tokens": [text]}}}


def as_transformers_llama(document, legacy=False, add_prefix_space=True):
    """A SentencePiece-style tokenizer.json (its parsed JSON) as transformers 5's LlamaTokenizer runs it (the class
    tokenizer_config.json names for Llama 1/2, TinyLlama, Mistral v0.1): whatever the file's
    normalizer, pre-tokenizer and decoder, it keeps only the BPE and the added tokens, and writes '▁'
    for spaces and before the text (`prepend_scheme`: "first", before the first piece only, unless
    `legacy`, "always", also after each special token; "never" without add_prefix_space), decoding
    back with byte fallback and one leading space stripped."""
    document = dict(document)
    scheme = "never" if not add_prefix_space else "always" if legacy else "first"
    strip = [{"type": "Strip", "content": " ", "start": 1, "stop": 0}] if add_prefix_space else []
    document.update(
        normalizer=None,
        pre_tokenizer={"type": "Metaspace", "replacement": "▁", "prepend_scheme": scheme, "split": False},
        decoder={"type": "Sequence", "decoders": [{"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                                                  {"type": "ByteFallback"}, {"type": "Fuse"}, *strip]})
    return json.dumps(document, ensure_ascii=False)
