"""Files that are not what they should be, and disks that fill up: every format is known by its first
bytes whatever its name, a file cut short says so in one line (what it is, the size it needs, the size
it has), a file of no known format says what it is not and what is read, and a write that runs out of
space says so in one line naming the file, leaving the old file as it was and no temporary behind."""
import errno
import os
import pickle
import shutil
import struct

import numpy as np
import pytest

from npllama import adapters
from npllama.io import files, safetensors_file, weights
from tests.test_cli_weights import FIXTURES, assert_one_clear_line, cli, load_weights_fails, ok, snapshot
from tests.conftest import ROOT

GGUF_FIXTURE = os.path.join(ROOT, "tests", "fixtures", "gguf", "gqa-q8_0.gguf")
PTH_FIXTURE = os.path.join(FIXTURES, "meta", "consolidated.00.pth")


@pytest.fixture(scope="module")
def npllama_file(tmp_path_factory):
    """The import fixture's model as an npllama weights file (2 layers, hidden 32, intermediate 64)."""
    path = tmp_path_factory.mktemp("model") / "model.safetensors"
    weights.save(path, *weights.load(os.path.join(FIXTURES, "hf")))
    return path


def fails_with(path, fragment):
    """load(path) and `load-weights path` both fail with one line holding fragment (nothing written)."""
    with pytest.raises(weights.WeightsError) as caught:
        weights.load(str(path))
    assert fragment in str(caught.value) and "\n" not in str(caught.value), str(caught.value)
    load_weights_fails(path.parent, path, fragment)


def cut_copy(tmp_path, source, name, keep):
    """A copy of source holding its first `keep` bytes; returns (path, the whole file's size)."""
    data = open(source, "rb").read()
    (tmp_path / name).write_bytes(data[:keep])
    return tmp_path / name, len(data)


# ---- known by its first bytes ---------------------------------------------------------------------------
@pytest.mark.parametrize("source,name", [("stories.bin", "model.safetensors"), ("stories_v2.bin", "weights")])
def test_a_llama2c_file_is_known_by_its_bytes_not_its_name(tmp_path, source, name):
    shutil.copy(os.path.join(FIXTURES, source), tmp_path / name)
    assert weights.detect(str(tmp_path / name)) == "llama2c"
    assert weights.load(str(tmp_path / name))[0].num_hidden_layers == 2


def test_an_npllama_file_is_known_by_its_bytes_not_its_name(tmp_path, npllama_file):
    shutil.copy(npllama_file, tmp_path / "model.bin")
    assert weights.detect(str(tmp_path / "model.bin")) == "npllama"
    assert weights.load(str(tmp_path / "model.bin"))[0].num_hidden_layers == 2


# ---- cut short ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("source", ["stories.bin", "stories_tied.bin", "stories_v1.bin", "stories_v2.bin"])
def test_a_llama2c_file_cut_short_names_the_size_its_header_needs(tmp_path, source):
    path, whole = cut_copy(tmp_path, os.path.join(FIXTURES, source), "cut.bin", -1000)
    fails_with(path, f"cut.bin is a llama2.c checkpoint cut short: its header (dim 32, hidden 64, 2 layers, 4 heads, "
                     f"2 key/value heads, vocabulary 384, context 64) needs {whole:,} bytes, the file has {whole - 1000:,}")


def test_a_legacy_llama2c_file_cut_short_is_known_without_the_bin_suffix(tmp_path):
    path, whole = cut_copy(tmp_path, os.path.join(FIXTURES, "stories.bin"), "stories", 428)
    fails_with(path, f"stories is a llama2.c checkpoint cut short: its header (dim 32, hidden 64, 2 layers, 4 heads, "
                     f"2 key/value heads, vocabulary 384, context 64) needs {whole:,} bytes, the file has 428")


def test_a_legacy_header_whose_dim_starts_like_a_pickle_is_still_llama2c(tmp_path):
    """dim 640 is the bytes 80 02 00 00, a pickle's PROTO 2; the zero after it is no pickle opcode."""
    header = struct.pack("<7i", 640, 1728, 2, 10, 5, 100, 32)
    (tmp_path / "m.bin").write_bytes(header + bytes(1000))
    assert header[:2] == b"\x80\x02"
    fails_with(tmp_path / "m.bin", "m.bin is a llama2.c checkpoint cut short: its header (dim 640, hidden 1728, "
                                   "2 layers, 10 heads, 5 key/value heads, vocabulary 100, context 32) needs ")


def test_a_versioned_llama2c_file_cut_inside_its_header(tmp_path):
    path, _ = cut_copy(tmp_path, os.path.join(FIXTURES, "stories_v1.bin"), "cut.bin", 100)
    fails_with(path, "cut.bin is a llama2.c checkpoint cut short: its header needs 256 bytes, the file has 100")


def test_a_legacy_llama2c_file_longer_than_its_header_says(tmp_path):
    data = open(os.path.join(FIXTURES, "stories.bin"), "rb").read()
    (tmp_path / "long.bin").write_bytes(data + b"\0" * 8)
    fails_with(tmp_path / "long.bin", f"calls for {len(data):,} bytes, but the file has {len(data) + 8:,}: "
                                      "not a llama2.c checkpoint, or a damaged one")


def test_a_safetensors_file_cut_in_its_tensors(tmp_path, npllama_file):
    path, whole = cut_copy(tmp_path, npllama_file, "cut.safetensors", -4)
    fails_with(path, f"cut.safetensors is a safetensors file cut short: its header and tensors need {whole:,} bytes, "
                     f"the file has {whole - 4:,}")


def test_a_safetensors_file_cut_in_its_header(tmp_path, npllama_file):
    (header_length,) = struct.unpack("<Q", open(npllama_file, "rb").read(8))
    path, _ = cut_copy(tmp_path, npllama_file, "cut.safetensors", 100)
    fails_with(path, f"cut.safetensors is a safetensors file cut short: its header needs {8 + header_length:,} "
                     "bytes, the file has 100")


@pytest.mark.parametrize("keep", [0.5, 0.01], ids=["in its tensors", "in its header"])
def test_a_gguf_file_cut_short(tmp_path, keep):
    size = os.path.getsize(GGUF_FIXTURE)
    path, _ = cut_copy(tmp_path, GGUF_FIXTURE, "cut.gguf", int(size * keep))
    fails_with(path, "cut.gguf: not a readable GGUF file, truncated or corrupt (")
    fails_with(path, f"the file {'has' if keep == 0.5 else 'ends at byte'} {int(size * keep):,}")


def test_a_zip_cut_short(tmp_path):
    path, _ = cut_copy(tmp_path, PTH_FIXTURE, "consolidated.00.pth", 5000)
    fails_with(path, "consolidated.00.pth: a zip archive cut short or damaged (its central directory, at the end, "
                     "is missing)")
    shutil.copy(os.path.join(FIXTURES, "meta", "params.json"), tmp_path)  # within its Meta directory
    fails_with(tmp_path, "consolidated.00.pth: not a zip archive (not a torch.save file, or truncated)")


# ---- no format npllama reads ------------------------------------------------------------------------------
NOT_WEIGHTS = {
    "text": (b"these are my notes, not weights\n" * 10,
             "notes: not a safetensors file, nor GGUF, a llama2.c checkpoint or a PyTorch zip (it starts "
             "b'these ar'); npllama reads those, and HF and Meta checkpoint directories"),
    "empty": (b"", "notes: not a safetensors file, nor GGUF, a llama2.c checkpoint or a PyTorch zip (it is empty)"),
    "pickle": (pickle.dumps({"w": [1.0, 2.0]}, protocol=4),
               "notes: a Python pickle (torch.save's format before torch 1.6), which npllama does not read"),
    "numpy": (None, "notes: a zip archive without a torch.save data.pkl, not a checkpoint npllama reads"),
}


@pytest.mark.parametrize("kind", NOT_WEIGHTS)
def test_a_file_of_no_known_format_says_what_it_is_not(tmp_path, kind):
    data, message = NOT_WEIGHTS[kind]
    if data is None:
        np.savez(tmp_path / "notes.npz", w=np.ones(3))
        os.rename(tmp_path / "notes.npz", tmp_path / "notes")
    else:
        (tmp_path / "notes").write_bytes(data)
    fails_with(tmp_path / "notes", message)


def test_a_lone_torch_checkpoint_points_to_its_meta_directory(tmp_path):
    shutil.copy(PTH_FIXTURE, tmp_path)
    fails_with(tmp_path / "consolidated.00.pth", "consolidated.00.pth: a PyTorch (torch.save) checkpoint; npllama reads "
                                                 "one as part of a Meta directory: give the directory that holds it "
                                                 "with params.json")


def q_adapters(params, config):
    """LoRA adapters of rank 2 on every q_proj (A random, B zero)."""
    return adapters.init_adapters(params, config, ("q_proj",), rank=2, alpha=4.0, seed=0)


def test_adapters_given_as_a_model_say_what_they_are(tmp_path, npllama_file):
    config, params, _ = weights.load(str(npllama_file))
    weights.save_adapters(tmp_path / "adapters.safetensors", q_adapters(params, config), 2, 4.0, ["q_proj"])
    fails_with(tmp_path / "adapters.safetensors", "adapters.safetensors: LoRA adapters, not a model: give them with "
                                                  "--lora beside the model they were trained on")


# ---- a full disk ----------------------------------------------------------------------------------------
class _FillingFile:
    """A file whose writes fail with ENOSPC (or another errno) once `room` bytes are written."""

    def __init__(self, file, room, code):
        self.file, self.room, self.code = file, room, code

    def write(self, data):
        if len(data) > self.room:
            self.file.write(bytes(data)[:self.room])
            raise OSError(self.code, os.strerror(self.code))
        self.room -= len(data)
        return self.file.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.file.close()


@pytest.fixture
def disk_fills(monkeypatch):
    """disk_fills(room, code=ENOSPC): from now on, files.write_atomically's writes fail past `room` bytes."""
    def fill(room, code=errno.ENOSPC):
        monkeypatch.setattr(files, "open", lambda path, mode: _FillingFile(open(path, mode), room, code), raising=False)
    return fill


def old_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"the user's old file")
    return path


def assert_untouched(tmp_path, path):
    assert path.read_bytes() == b"the user's old file"
    assert not [name for name in os.listdir(tmp_path) if name.endswith(files.TEMPORARY_SUFFIX)], os.listdir(tmp_path)


@pytest.mark.parametrize("code,reason", [(errno.ENOSPC, "no space left on device"), (errno.EDQUOT, "disk quota exceeded")])
def test_a_full_disk_mid_write_is_one_line_and_the_old_file_stays(tmp_path, npllama_file, disk_fills, code, reason):
    model = weights.load(str(npllama_file))
    path = old_file(tmp_path, "model.safetensors")
    disk_fills(room=5000, code=code)
    with pytest.raises(files.DiskFullError) as caught:
        weights.save(path, *model)
    assert str(caught.value) == f"{reason} writing {path}; nothing was replaced"
    assert_untouched(tmp_path, path)


def test_a_full_disk_writing_a_new_file_leaves_nothing(tmp_path, npllama_file, disk_fills):
    model = weights.load(str(npllama_file))
    disk_fills(room=0)
    with pytest.raises(files.DiskFullError, match="nothing was written$"):
        safetensors_file.write(tmp_path / "new.safetensors", dict(model[1]))
    assert os.listdir(tmp_path) == []


def test_a_full_disk_saving_adapters(tmp_path, npllama_file, disk_fills):
    config, params, _ = weights.load(str(npllama_file))
    path = old_file(tmp_path, "adapters.safetensors")
    disk_fills(room=100)
    with pytest.raises(files.DiskFullError, match=f"^no space left on device writing {path}; nothing was replaced$"):
        weights.save_adapters(path, q_adapters(params, config), 2, 4.0, ["q_proj"], base_params=params)
    assert_untouched(tmp_path, path)


COMMANDS = {  # command -> (its arguments given the model file and the output directory, the file it writes)
    "load-weights": (lambda model, out: ["load-weights", model, "--out", out / "m.safetensors", "--force"], "m.safetensors"),
    "export-gguf": (lambda model, out: ["export-gguf", model, out / "m.gguf", "--force"], "m.gguf"),
    "export-hf": (lambda model, out: ["export-hf", model, out, "--force"], "model.safetensors"),
    "merge-lora": (lambda model, out: ["merge-lora", model, out / "adapters.safetensors", "--out", out / "m.safetensors",
                                       "--force"], "m.safetensors"),
}


@pytest.mark.parametrize("command", COMMANDS)
def test_a_full_disk_in_a_command_is_one_line(tmp_path, npllama_file, monkeypatch, command):
    arguments, written = COMMANDS[command]
    out = tmp_path / "out"
    out.mkdir()
    config, params, _ = weights.load(str(npllama_file))
    weights.save_adapters(out / "adapters.safetensors", q_adapters(params, config), 2, 4.0, ["q_proj"],
                          base_params=params)
    path = old_file(out, written)
    before = snapshot(out)

    def full(fd):  # from now on every file fails as it is flushed to disk, as on a full disk
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "fsync", full)
    result = cli(*arguments(npllama_file, out))
    assert_one_clear_line(result, f"Error: no space left on device writing {path}; nothing was replaced")
    assert snapshot(out) == before


def test_writing_without_a_full_disk_still_works(tmp_path, npllama_file):
    ok(cli("load-weights", npllama_file, "--out", tmp_path / "m.safetensors"))
    assert os.listdir(tmp_path) == ["m.safetensors"]
