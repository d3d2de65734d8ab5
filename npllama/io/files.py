"""Writing files so that a reader never sees half of one: a temporary file beside the target, flushed
to disk, then renamed over it (a rename within one folder is atomic on POSIX and Windows). If the
writing fails or is interrupted, the temporary file is removed and the target is as it was. A full disk
(or quota) is said in one line naming the target (DiskFullError), not as the temporary file's OSError."""
import contextlib
import errno
import os
import tempfile

from ..errors import UserError

TEMPORARY_SUFFIX = ".tmp"
FULL = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}


class DiskFullError(UserError):
    """The disk (or the user's quota) filled up while a file was written; the target is untouched.
    .reason: "no space left on device" or "disk quota exceeded"."""

    def __init__(self, message, reason):
        super().__init__(message)
        self.reason = reason


@contextlib.contextmanager
def replacing(path):
    """A temporary path beside `path` for the block to write (and close); when the block ends without
    an error it is synced to disk and renamed to path, otherwise removed."""
    with full_disk_said(path):
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


@contextlib.contextmanager
def full_disk_said(path, outcome=None):
    """A full disk or quota, wherever the writing met it, as one line about the file being written and
    what became of it (default: for a file written whole, that nothing was replaced or written)."""
    try:
        yield
    except OSError as error:
        if error.errno not in FULL:
            raise
        outcome = outcome or ("nothing was replaced" if os.path.exists(path) else "nothing was written")
        raise DiskFullError(f"{FULL[error.errno]} writing {path}; {outcome}", FULL[error.errno]) from None


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
