"""Read a `torch.save` state dict (Meta's consolidated.*.pth) without torch, memory-mapped.

The format (torch >= 1.6; Meta's Llama checkpoints use it): a zip archive, every member stored
uncompressed, whose member names all start with one directory, `<archive>/` (torch uses the file's
stem). The members that matter:
    <archive>/data.pkl     a pickle of the state dict, with each tensor's bytes left out
    <archive>/data/<key>   one storage's raw bytes (the flat buffer behind one or more tensors)
    <archive>/byteorder    "little" or "big" (absent in files from older torch: little-endian)
(.format_version, .storage_alignment, version and .data/serialization_id are not needed to read.)

The pickle is a dict (often a collections.OrderedDict) of name -> tensor, each tensor pickled as
    torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad,
                                    backward_hooks[, metadata])
with offset and strides counted in elements, backward_hooks an empty OrderedDict, and a
torch.nn.Parameter wrapped once more in torch._utils._rebuild_parameter(tensor, requires_grad, hooks).
`storage` is a persistent id, a tuple the pickle leaves for the loader to resolve:
    ('storage', torch.<Type>Storage, key, location, numel)
where the storage class names the element type (FloatStorage, HalfStorage, BFloat16Storage, ...),
`key` names the member data/<key>, `location` is the device it was saved from ('cpu', 'cuda:0'; ignored
here), and numel counts elements. Tensors that share a storage (a slice, a transpose) name the same key.

Each storage is mapped with numpy.memmap (read-only) at its member's data offset in the file: the local
file header at the member's offset is 30 bytes plus the name and an extra field, whose lengths it holds.
Nothing is read into memory, so a 13.5 GB checkpoint loads at once and pages in as it is used (and the
storages' CRCs go unchecked: checking would read them all; data.pkl and byteorder are checked). A
compressed member (never written by torch, but possible in a re-zipped file) is refused with a
CheckpointFormatError rather than silently inflated into memory.

Why the unpickler is restricted: unpickling calls whatever global the pickle names (os.system,
builtins.eval, ...) with arguments the pickle chooses, so an untrusted .pth could run any code.
The unpickler here resolves only the few globals a state dict needs, to npllama's own stand-ins
(torch is never imported), and refuses every other with UnsafePickleError before anything is called.
"""
import collections
import io
import os
import pickle
import struct
import zipfile

import numpy as np

from ..dtypes import BFLOAT16
from ..errors import UserError

# torch's storage class -> the element type of its bytes (little-endian).
STORAGE_DTYPES = {"DoubleStorage": np.dtype("<f8"), "FloatStorage": np.dtype("<f4"),
                  "HalfStorage": np.dtype("<f2"), "BFloat16Storage": BFLOAT16,
                  "LongStorage": np.dtype("<i8"), "IntStorage": np.dtype("<i4"),
                  "ShortStorage": np.dtype("<i2"), "CharStorage": np.dtype("i1"),
                  "ByteStorage": np.dtype("u1"), "BoolStorage": np.dtype("?")}

LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, (22 bytes not needed), name length, extra length
LOCAL_HEADER_SIGNATURE = b"PK\x03\x04"
# torch < 1.6 wrote a bare pickle stream that starts with a pickled magic number (protocol 2, LONG1).
LEGACY_MAGIC = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)[:-1]


class CheckpointFormatError(UserError):
    """The file is not a torch.save zip archive of tensors, or is damaged (message names the path)."""


class UnsafePickleError(UserError):
    """The pickle names a global a state dict does not need: loading it could run arbitrary code."""


def load(path):
    """name -> array for the state dict that torch.save wrote to path.

    Each array has the tensor's shape and stored dtype (bf16 as dtypes.BFLOAT16) and is a read-only
    view into a memory map of the file, with the tensor's own strides and offset: C-contiguous when the
    tensor was, a strided view otherwise (a transpose, a slice), never a copy. Tensors that share a
    storage share memory. np.ascontiguousarray(array) gives a contiguous copy where one is needed.
    Raises CheckpointFormatError or UnsafePickleError (both ValueError) with a one-line message.
    """
    path = os.fspath(path)
    archive = _open_archive(path)
    with archive:
        prefix = _archive_prefix(archive)
        _check_byteorder(path, archive, prefix)
        pickled = _read_member(path, archive, prefix + "data.pkl")
        unpickler = _StateDictUnpickler(path, archive, prefix, pickled)
        state_dict = unpickler.load_state_dict()
    return state_dict


def _open_archive(path):
    try:
        return zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        with open(path, "rb") as file:
            legacy = file.read(len(LEGACY_MAGIC)) == LEGACY_MAGIC
    if legacy:
        raise CheckpointFormatError(f"{path}: saved in torch's legacy (before 1.6) format, which npllama "
                                    f"does not read; re-save it with a recent torch")
    raise CheckpointFormatError(f"{path}: not a zip archive (not a torch.save file, or truncated)")


def _archive_prefix(archive):
    """'<archive>/', the directory every member sits in (taken from the first, as torch does)."""
    names = archive.namelist()
    return names[0].split("/")[0] + "/" if names else ""


def _check_byteorder(path, archive, prefix):
    if prefix + "byteorder" not in archive.namelist():
        return  # written before torch recorded it: little-endian
    byteorder = _read_member(path, archive, prefix + "byteorder").decode("ascii", "replace")
    if byteorder != "little":
        raise CheckpointFormatError(f"{path}: storages are {byteorder!r}-endian; only little-endian is read")


def _read_member(path, archive, name):
    """A small member's bytes, checked against its CRC."""
    try:
        return archive.read(name)
    except KeyError:
        raise CheckpointFormatError(f"{path}: no {name} in the archive (not a torch.save file)") from None
    except (zipfile.BadZipFile, EOFError) as error:
        raise CheckpointFormatError(f"{path}: damaged member {name} ({error})") from None


class _StateDictUnpickler(pickle.Unpickler):
    """Unpickles data.pkl with the allowed globals replaced by stand-ins that build numpy arrays."""

    def __init__(self, path, archive, prefix, pickled):
        super().__init__(io.BytesIO(pickled))
        self.path, self.archive, self.prefix = path, archive, prefix
        self.storages = {}  # key -> memmap, so tensors sharing a storage share memory
        self.allowed_globals = {("collections", "OrderedDict"): collections.OrderedDict,
                                ("torch._utils", "_rebuild_tensor_v2"): self._rebuild_tensor,
                                ("torch._utils", "_rebuild_parameter"): _rebuild_parameter}
        self.allowed_globals.update({("torch", name): dtype for name, dtype in STORAGE_DTYPES.items()})

    def load_state_dict(self):
        try:
            state_dict = self.load()
        except (UnsafePickleError, CheckpointFormatError):
            raise
        except Exception as error:  # any other failure of untrusted bytes means a damaged file
            raise CheckpointFormatError(f"{self.path}: damaged data.pkl ({type(error).__name__}: "
                                        f"{error})") from None
        return self._checked_state_dict(state_dict)

    def find_class(self, module, name):
        try:
            return self.allowed_globals[module, name]
        except KeyError:
            raise UnsafePickleError(f"{self.path}: refusing to load: the pickle names the global "
                                    f"{module}.{name}, which a checkpoint does not need") from None

    def persistent_load(self, persistent_id):
        """('storage', dtype from a *Storage global, key, location, numel) -> 1-D array over the bytes."""
        if not (isinstance(persistent_id, tuple) and len(persistent_id) == 5 and persistent_id[0] == "storage"
                and isinstance(persistent_id[1], np.dtype)):
            raise CheckpointFormatError(f"{self.path}: data.pkl holds an unexpected persistent id "
                                        f"{persistent_id!r:.80}")
        _, dtype, key, _, numel = persistent_id
        if key not in self.storages:
            self.storages[key] = self._map_storage(str(key), dtype, int(numel))
        return self.storages[key]

    def _map_storage(self, key, dtype, numel):
        name = f"{self.prefix}data/{key}"
        try:
            info = self.archive.getinfo(name)
        except KeyError:
            raise CheckpointFormatError(f"{self.path}: no member {name} for storage {key}") from None
        if info.compress_type != zipfile.ZIP_STORED:
            raise CheckpointFormatError(f"{self.path}: member {name} is compressed (method "
                                        f"{info.compress_type}); torch.save stores storages uncompressed")
        if info.file_size < numel * dtype.itemsize:
            raise CheckpointFormatError(f"{self.path}: member {name} holds {info.file_size} bytes, fewer "
                                        f"than its {numel} elements of {dtype.itemsize} bytes (truncated)")
        if numel == 0:  # mmap cannot map zero bytes
            empty = np.empty(0, dtype)
            empty.flags.writeable = False  # read-only like every other storage
            return empty
        offset = self._data_offset(info)
        return np.memmap(self.path, dtype=dtype, mode="r", offset=offset, shape=(numel,))

    def _data_offset(self, info):
        """Where a member's bytes start in the file: after its local header, name and extra field."""
        with open(self.path, "rb") as file:
            file.seek(info.header_offset)
            header = file.read(LOCAL_HEADER.size)
            file_size = os.fstat(file.fileno()).st_size
        if len(header) < LOCAL_HEADER.size or header[:4] != LOCAL_HEADER_SIGNATURE:
            raise CheckpointFormatError(f"{self.path}: damaged zip: no local header for {info.filename}")
        _, name_length, extra_length = LOCAL_HEADER.unpack(header)
        offset = info.header_offset + LOCAL_HEADER.size + name_length + extra_length
        if offset + info.file_size > file_size:
            raise CheckpointFormatError(f"{self.path}: member {info.filename} runs past the end of the "
                                        f"file (truncated)")
        return offset

    def _rebuild_tensor(self, storage, storage_offset, size, stride, requires_grad, backward_hooks,
                        metadata=None):
        """Stand-in for torch._utils._rebuild_tensor_v2: a view of the storage (metadata, the Python
        attributes of a tensor subclass, is not needed for weights and is dropped)."""
        itemsize = storage.dtype.itemsize
        try:
            return np.ndarray(tuple(size), storage.dtype, buffer=storage, offset=storage_offset * itemsize,
                              strides=tuple(step * itemsize for step in stride))
        except ValueError:  # numpy checks that the view stays inside the storage
            raise CheckpointFormatError(f"{self.path}: a tensor (size {tuple(size)}, stride {tuple(stride)},"
                                        f" offset {storage_offset}) does not fit in its storage of "
                                        f"{storage.size} elements") from None

    def _checked_state_dict(self, state_dict):
        if not isinstance(state_dict, dict):
            raise CheckpointFormatError(f"{self.path}: data.pkl holds a {type(state_dict).__name__}, "
                                        f"not a state dict")
        for name, value in state_dict.items():
            if not isinstance(name, str) or not isinstance(value, np.ndarray):
                raise CheckpointFormatError(f"{self.path}: the state dict maps {name!r:.80} to a "
                                            f"{type(value).__name__}, not a tensor")
        return dict(state_dict)


def _rebuild_parameter(data, requires_grad, backward_hooks):
    """Stand-in for torch._utils._rebuild_parameter: a Parameter is its tensor."""
    return data
