"""The SentencePiece model file (sentencepiece_model.proto's ModelProto), read and written as much as
npllama needs, on protobuf's wire format: a message is a run of fields, each a varint key
(number << 3 | wire type) then a varint (type 0), 8 bytes (1), a length and that many bytes (2), or
4 bytes (5). The fields used (numbers from the .proto):
    ModelProto       1 pieces (repeated SentencePiece), 2 trainer_spec, 3 normalizer_spec
    SentencePiece    1 piece (str), 2 score (float), 3 type (1 normal, 2 unknown, 3 control,
                     4 user-defined, 5 unused, 6 byte)
    TrainerSpec      3 model_type (2: BPE), 4 vocab_size, 35 byte_fallback, 40-43 unk/bos/eos/pad id,
                     45-48 unk/bos/eos/pad piece
    NormalizerSpec   1 name, 3 add_dummy_prefix, 4 remove_extra_whitespaces, 5 escape_whitespaces
Fields a message does not write take the .proto's defaults (add_dummy_prefix and
remove_extra_whitespaces: true).
"""
import struct

from ..errors import TokenizerError

PIECES, TRAINER, NORMALIZER = 1, 2, 3
ADD_DUMMY_PREFIX, REMOVE_EXTRA_WHITESPACES = 3, 4


def field(number, value):
    """One field: bool/int as a varint, float as 4 bytes, str/bytes length-delimited."""
    if isinstance(value, float):
        return _varint(number << 3 | 5) + struct.pack("<f", value)
    if isinstance(value, (str, bytes)):
        data = value.encode("utf-8") if isinstance(value, str) else value
        return _varint(number << 3 | 2) + _varint(len(data)) + data
    return _varint(number << 3) + _varint(int(value) & (2 ** 64 - 1))  # negative ints: two's complement


def fields(data):
    """[(number, value, the field's bytes)] of one message: a varint as an int, the rest as bytes."""
    found, position = [], 0
    while position < len(data):
        start = position
        key, position = _read_varint(data, position)
        wire = key & 7
        if wire == 0:
            value, position = _read_varint(data, position)
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, position = data[position:position + size], position + size
        elif wire == 2:
            length, position = _read_varint(data, position)
            value, position = data[position:position + length], position + length
        else:
            raise TokenizerError(f"the SentencePiece model is not a protobuf message (wire type {wire})")
        found.append((key >> 3, value, data[start:position]))
    return found


def values(data, number, default=None):
    """Every value of one field number (a one-item list of default when it is absent)."""
    found = [value for n, value, _ in fields(data) if n == number]
    return found or [default]


def pieces(model):
    """[(piece, score, type)] of a ModelProto's vocabulary, in id order."""
    table = []
    for number, piece, _ in fields(model):
        if number == PIECES:
            text = values(piece, 1, b"")[0].decode("utf-8")
            score = values(piece, 2, None)[0]
            table.append((text, struct.unpack("<f", score)[0] if score is not None else 0.0, values(piece, 3, 1)[0]))
    return table


def normalizer_flags(model):
    """(add_dummy_prefix, remove_extra_whitespaces) of a ModelProto."""
    normalizer = values(model, NORMALIZER, b"")[0]
    return (bool(values(normalizer, ADD_DUMMY_PREFIX, 1)[0]),
            bool(values(normalizer, REMOVE_EXTRA_WHITESPACES, 1)[0]))


def without_dummy_prefix(model):
    """The same model, but encoding puts no '▁' before a text (normalizer_spec.add_dummy_prefix false)."""
    others = b"".join(raw for number, _, raw in fields(model) if number != NORMALIZER)
    kept = b"".join(raw for n, _, raw in fields(values(model, NORMALIZER, b"")[0]) if n != ADD_DUMMY_PREFIX)
    return others + field(NORMALIZER, kept + field(ADD_DUMMY_PREFIX, False))


def _varint(value):
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _read_varint(data, position):
    value = shift = 0
    while True:
        if position >= len(data):
            raise TokenizerError("the SentencePiece model is not a protobuf message (it ends inside a field)")
        byte = data[position]
        value |= (byte & 0x7F) << shift
        position, shift = position + 1, shift + 7
        if not byte & 0x80:
            return value, position
