"""Writing files so that a reader never sees half of one: a temporary file beside the target, flushed
to disk, then renamed over it (a rename within one folder is atomic on POSIX and Windows). If the
writing fails or is interrupted, the temporary file is removed and the target is as it was."""
import contextlib
import os
import tempfile

TEMPORARY_SUFFIX = ".tmp"


@contextlib.contextmanager
def replacing(path):
    """A temporary path beside `path` for the block to write (and close); when the block ends without
    an error it is synced to disk and renamed to path, otherwise removed."""
    handle, temporary = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)),
                                         prefix="." + os.path.basename(path) + ".", suffix=TEMPORARY_SUFFIX)
    os.close(handle)
    try:
        yield temporary
        with open(temporary, "rb+") as file:
            os.fsync(file.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp makes it private; give it a new file's usual mode
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def remove_leftovers(directory):
    """Remove the temporary files `replacing` left in directory when its process was killed mid-write
    (.NAME.XXXXXXXX.tmp); the names removed. Only for a directory no other process is writing in."""
    leftovers = [name for name in os.listdir(directory)
                 if name.startswith(".") and name.endswith(TEMPORARY_SUFFIX) and name.count(".") >= 3]
    for name in leftovers:
        os.remove(os.path.join(directory, name))
    return leftovers


def write_atomically(path, blocks):
    """Write the byte blocks (an iterable of bytes-like objects, consumed one at a time) to path."""
    with replacing(path) as temporary, open(temporary, "wb") as file:
        for block in blocks:
            file.write(block)
