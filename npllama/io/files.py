"""Writing files so that a reader never sees half of one: a temporary file beside the target, flushed
to disk, then renamed over it (a rename within one folder is atomic on POSIX and Windows). If the
writing fails or is interrupted, the temporary file is removed and the target is as it was."""
import os
import tempfile


def write_atomically(path, blocks):
    """Write the byte blocks (an iterable of bytes-like objects, consumed one at a time) to path."""
    handle, temporary = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)),
                                         prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            for block in blocks:
                file.write(block)
            file.flush()
            os.fsync(file.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp makes it private; give it a new file's usual mode
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
