"""torch_pickle reads torch.save checkpoints without torch: exact values, memory-mapped, and safely.

The .pth fixtures come from tests/fixtures/make_pth_fixtures.py (torch, run by hand) with their expected
values in .npz files; every other checkpoint here is built in the test from raw pickle opcodes and zipfile,
so no torch is needed.
"""
import json
import os
import pathlib
import struct
import zipfile

import numpy as np
import pytest

from npllama import dtypes
from npllama.io import torch_pickle
from npllama.io.torch_pickle import CheckpointFormatError, UnsafePickleError

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "pth")
FIXTURE_NAMES = ["all_dtypes", "meta_layout", "protocol_4"]


def fixture_path(name):
    return os.path.join(FIXTURES, name + ".pth")


def expected(name):
    """(name -> contiguous expected values, name -> {dtype, stride, storage_offset}) in saved order."""
    with np.load(os.path.join(FIXTURES, name + ".npz"), allow_pickle=False) as npz:
        manifest = json.loads(str(npz["__manifest__"]))
        return {key: npz[key] for key in manifest}, manifest


def expected_dtype(dtype_name):
    return dtypes.BFLOAT16 if dtype_name == "bfloat16" else np.dtype(dtype_name)


def memory_map_behind(array):
    """The numpy.memmap an array views, following its chain of bases (None when there is none)."""
    while array is not None and not isinstance(array, np.memmap):
        array = getattr(array, "base", None)
    return array


# ---- the torch-written fixtures ----

@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_fixture_loads_exact_values_dtypes_and_shapes(name):
    values, manifest = expected(name)
    loaded = torch_pickle.load(fixture_path(name))
    assert list(loaded) == list(values)
    for key, value in values.items():
        assert loaded[key].dtype == expected_dtype(manifest[key]["dtype"]), key
        assert loaded[key].shape == value.shape, key
        assert np.ascontiguousarray(loaded[key]).tobytes() == value.tobytes(), key  # bits: NaN, -0 exact


def test_fixture_covers_every_storage_type():
    _, manifest = expected("all_dtypes")
    saved = {expected_dtype(entry["dtype"]) for entry in manifest.values()}
    assert saved == set(torch_pickle.STORAGE_DTYPES.values())


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_arrays_keep_torch_strides_without_copying(name):
    _, manifest = expected(name)
    for key, array in torch_pickle.load(fixture_path(name)).items():
        assert array.strides == tuple(step * array.itemsize for step in manifest[key]["stride"]), key


def test_views_share_their_storage_at_torch_offsets():
    _, manifest = expected("all_dtypes")
    loaded = torch_pickle.load(fixture_path("all_dtypes"))
    start = loaded["fp32.matrix"].__array_interface__["data"][0]
    for key in ["fp32.transposed", "fp32.rows_2_to_4", "fp32.column_3"]:
        assert np.shares_memory(loaded[key], loaded["fp32.matrix"]), key
        offset = loaded[key].__array_interface__["data"][0] - start
        assert offset == manifest[key]["storage_offset"] * 4, key
    assert not loaded["fp32.transposed"].flags.c_contiguous


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_arrays_are_read_only_memory_maps_of_the_file(name):
    for key, array in torch_pickle.load(fixture_path(name)).items():
        if array.size:
            assert memory_map_behind(array) is not None, key
            assert os.path.samefile(memory_map_behind(array).filename, fixture_path(name)), key
        assert not array.flags.writeable, key


def test_accepts_a_path_object():
    assert list(torch_pickle.load(pathlib.Path(fixture_path("protocol_4")))) == ["a.weight", "b.weight"]


# ---- checkpoints built here from pickle opcodes ----

def op_str(text):
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data  # BINUNICODE


def op_int(value):
    return b"J" + struct.pack("<i", value)  # BININT


def op_tuple(*items):
    return b"(" + b"".join(items) + b"t"  # MARK ... TUPLE


def op_global(module, name):
    return b"c" + f"{module}\n{name}\n".encode()  # GLOBAL


def op_call(function, *args):
    return function + op_tuple(*args) + b"R"  # REDUCE


def op_dict(*items):
    return b"}(" + b"".join(op_str(key) + value for key, value in items) + b"u"  # EMPTY_DICT MARK SETITEMS


def op_storage():
    """Storage 0 (6 float32s) as torch names it: a persistent id, resolved by BINPERSID."""
    return op_tuple(op_str("storage"), op_global("torch", "FloatStorage"), op_str("0"), op_str("cpu"),
                    op_int(6)) + b"Q"


def op_tensor(offset=0, size=(2, 3), stride=(3, 1)):
    """A float32 tensor over storage 0, as torch.save pickles one."""
    return op_call(op_global("torch._utils", "_rebuild_tensor_v2"), op_storage(), op_int(offset),
                   op_tuple(*map(op_int, size)), op_tuple(*map(op_int, stride)), b"\x89",  # NEWFALSE
                   op_call(op_global("collections", "OrderedDict")))


def protocol_2(body):
    return b"\x80\x02" + body + b"."


STORAGE_0 = np.arange(6, dtype="<f4").tobytes()


def write_checkpoint(path, data_pkl, storages=None, byteorder="little", zip64=False):
    """A torch.save-shaped zip: archive/data.pkl, archive/byteorder, archive/data/<key> (with zip64
    headers, as in files over 4 GB, when asked)."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", data_pkl)
        archive.writestr("archive/byteorder", byteorder)
        for key, data in (storages if storages is not None else {"0": STORAGE_0}).items():
            with archive.open(f"archive/data/{key}", "w", force_zip64=zip64) as member:
                member.write(data)
    return path


def test_crafted_checkpoint_loads(tmp_path):
    """The opcode helpers build what torch writes: the failures below differ only in what they break."""
    column = op_tensor(offset=1, size=(2,), stride=(3,))
    path = write_checkpoint(tmp_path / "ok.pth", protocol_2(op_dict(("w", op_tensor()), ("v", column))))
    loaded = torch_pickle.load(path)
    assert loaded["w"].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert loaded["v"].tolist() == [1, 4]


def test_zip64_member_loads(tmp_path):
    path = write_checkpoint(tmp_path / "zip64.pth", protocol_2(op_dict(("w", op_tensor()))), zip64=True)
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("archive/data/0")
    local_extra_length, = struct.unpack("<H", path.read_bytes()[info.header_offset + 28:][:2])
    assert local_extra_length > len(info.extra)  # only the local header has the zip64 field: it is read
    assert torch_pickle.load(path)["w"].tolist() == [[0, 1, 2], [3, 4, 5]]


def touch_call(module, name, sentinel):
    """A call of module.name on a shell command that creates the sentinel file."""
    return op_call(op_global(module, name), op_str(f"touch {sentinel}"))


def stack_global_eval(sentinel):
    """Protocol 4 names a global with STACK_GLOBAL (module and name from the stack): find_class sees it too."""
    return (b"\x80\x04" + op_str("builtins") + op_str("eval") + b"\x93"
            + op_tuple(op_str(f"__import__('os').system('touch {sentinel}')")) + b"R.")


MALICIOUS_PICKLES = {
    "os.system": lambda sentinel: protocol_2(touch_call("os", "system", sentinel)),
    "posix.system": lambda sentinel: protocol_2(touch_call("posix", "system", sentinel)),
    "builtins.eval": stack_global_eval,
    # hidden after a legitimate tensor
    "subprocess.getoutput": lambda sentinel: protocol_2(op_dict(
        ("w", op_tensor()), ("x", touch_call("subprocess", "getoutput", sentinel)))),
    # an allowed module does not allow its other names
    "torch.load": lambda sentinel: protocol_2(touch_call("torch", "load", sentinel)),
}


@pytest.mark.parametrize("global_name", MALICIOUS_PICKLES)
def test_malicious_pickle_is_refused_without_running(tmp_path, global_name):
    sentinel = tmp_path / "pwned"
    path = write_checkpoint(tmp_path / "evil.pth", MALICIOUS_PICKLES[global_name](sentinel))
    with pytest.raises(UnsafePickleError) as raised:
        torch_pickle.load(path)
    assert str(raised.value) == (f"{path}: refusing to load: the pickle names the global {global_name}, "
                                 f"which a checkpoint does not need")
    assert isinstance(raised.value, ValueError)
    assert not sentinel.exists()


def rezip(source, destination, replace=None, compression=zipfile.ZIP_STORED):
    """A copy of a zip made by Python's zipfile (storages no longer aligned); replace maps a member's
    name suffix to its new bytes, or to None to leave it out."""
    replace = replace or {}
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(destination, "w", compression) as new:
        for info in old.infolist():
            suffix = info.filename.split("/", 1)[1]
            data = replace.get(suffix, old.read(info))
            if data is not None:
                new.writestr(info.filename, data)
    return destination


def test_file_without_byteorder_record_reads_as_little_endian(tmp_path):
    path = rezip(fixture_path("all_dtypes"), tmp_path / "old.pth", replace={"byteorder": None})
    values, _ = expected("all_dtypes")
    loaded = torch_pickle.load(path)
    for key, value in values.items():
        assert np.ascontiguousarray(loaded[key]).tobytes() == value.tobytes(), key


def patch_local_header(path, member_suffix, position, data):
    """Overwrite bytes of one member's local file header (position counted from the header's start)."""
    with zipfile.ZipFile(path) as archive:
        info = next(info for info in archive.infolist() if info.filename.endswith(member_suffix))
    with open(path, "r+b") as file:
        file.seek(info.header_offset + position)
        file.write(data)
    return path


def copy_of(name, tmp_path):
    destination = tmp_path / (name + ".pth")
    destination.write_bytes(open(fixture_path(name), "rb").read())
    return destination


def corrupted_data_pkl(tmp_path):
    """A copy whose data.pkl has one byte changed, which its CRC reveals."""
    with zipfile.ZipFile(fixture_path("all_dtypes")) as archive:
        pickled = archive.read("all_dtypes/data.pkl")
    data = bytearray(open(fixture_path("all_dtypes"), "rb").read())
    data[data.index(pickled) + 40] ^= 0xFF
    (tmp_path / "flipped.pth").write_bytes(data)
    return tmp_path / "flipped.pth"


def truncated_copy(tmp_path):
    data = open(fixture_path("all_dtypes"), "rb").read()
    (tmp_path / "cut.pth").write_bytes(data[:len(data) // 2])
    return tmp_path / "cut.pth"


def text_file(tmp_path):
    (tmp_path / "notes.pth").write_text("not a checkpoint\n")
    return tmp_path / "notes.pth"


def other_zip(tmp_path):
    with zipfile.ZipFile(tmp_path / "other.pth", "w") as archive:
        archive.writestr("archive/readme.txt", "hello")
    return tmp_path / "other.pth"


def crafted(data_pkl, **options):
    return lambda tmp_path: write_checkpoint(tmp_path / "crafted.pth", data_pkl, **options)


BROKEN_FILES = {
    "text file": (text_file, "not a zip archive"),
    "truncated zip": (truncated_copy, "not a zip archive (not a torch.save file, or truncated)"),
    "corrupted data.pkl": (corrupted_data_pkl, "damaged member all_dtypes/data.pkl (Bad CRC-32"),
    "legacy format": (lambda tmp_path: fixture_path("legacy_format"), "torch's legacy (before 1.6) format"),
    "no data.pkl": (other_zip, "no archive/data.pkl in the archive"),
    "big-endian": (crafted(protocol_2(op_dict(("w", op_tensor()))), byteorder="big"), "'big'-endian"),
    "compressed storage": (lambda tmp_path: rezip(fixture_path("all_dtypes"), tmp_path / "deflated.pth",
                                                  compression=zipfile.ZIP_DEFLATED), "is compressed"),
    "missing storage": (crafted(protocol_2(op_dict(("w", op_tensor()))), storages={}),
                        "no member archive/data/0 for storage 0"),
    "short storage": (crafted(protocol_2(op_dict(("w", op_tensor()))), storages={"0": STORAGE_0[:20]}),
                      "holds 20 bytes, fewer than its 6 elements of 4 bytes"),
    "damaged local header": (lambda tmp_path: patch_local_header(copy_of("protocol_4", tmp_path), "data/0", 0,
                                                                 b"XXXX"), "no local header for"),
    "member past the end": (lambda tmp_path: patch_local_header(copy_of("protocol_4", tmp_path), "data/0", 28,
                                                                struct.pack("<H", 0xFFFF)), "runs past the end"),
    "tensor past its storage": (crafted(protocol_2(op_dict(("w", op_tensor(size=(3, 3)))))), "does not fit"),
    "offset past its storage": (crafted(protocol_2(op_dict(("w", op_tensor(offset=5))))), "does not fit"),
    "negative size": (crafted(protocol_2(op_dict(("w", op_tensor(size=(-2, 3)))))), "does not fit"),
    "strange persistent id": (crafted(protocol_2(op_dict(("w", op_tuple(op_str("evil")) + b"Q")))),
                              "unexpected persistent id ('evil',)"),
    "garbage pickle": (crafted(b"\x80\x02garbage"), "damaged data.pkl"),
    "wrong arguments": (crafted(protocol_2(op_call(op_global("torch._utils", "_rebuild_tensor_v2")))),
                        "damaged data.pkl (TypeError"),
    "not a dict": (crafted(protocol_2(b"]")), "data.pkl holds a list, not a state dict"),
    "not a tensor": (crafted(protocol_2(op_dict(("step", op_int(3))))), "maps 'step' to a int, not a tensor"),
}


@pytest.mark.parametrize("case", BROKEN_FILES)
def test_broken_file_is_a_format_error_naming_path_and_problem(tmp_path, case):
    make_file, problem = BROKEN_FILES[case]
    path = make_file(tmp_path)
    with pytest.raises(CheckpointFormatError) as raised:
        torch_pickle.load(path)
    message = str(raised.value)
    assert message.startswith(f"{path}: ") and problem in message and "\n" not in message
    assert isinstance(raised.value, ValueError) and not isinstance(raised.value, UnsafePickleError)
