"""Data parallelism on the CPU: the shards of one batch computed at the same time, one per core.

NumPy runs elementwise work on one core, and it holds Python's GIL through its many small reductions,
so threads of one process keep waiting for each other; processes do not. The main process computes
the first shard itself while each helper process (one per further core, started on first use,
running `serve`) computes one more. Parameters and gradients travel through shared memory (files
in /dev/shm, mapped by every process and then removed): each step copies the parameters in once,
each helper writes its shard's gradients there, and the main process adds them to its own. Small
messages (the config, the shard's tokens and targets, the loss) go through the helpers' stdin and
stdout as pickles.
"""
import atexit
import os
import pickle
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import traceback

import numpy as np

from . import backend

ALIGNMENT = 64  # bytes: each array starts on a cache line
SHARED_DIRECTORY = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()  # RAM-backed on Linux


class HelperError(RuntimeError):
    """A helper process failed or exited (message fit for the user)."""


def _offsets(layout):
    """Byte offsets of (name, shape, dtype) arrays laid out one after another, and the total size."""
    offsets, size = [], 0
    for _, shape, dtype in layout:
        offsets.append(size)
        size += (int(np.prod(shape)) * np.dtype(dtype).itemsize + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT
    return offsets, max(size, 1)


def _new_file(size):
    """A file of this size in shared memory, its space reserved now (a full /dev/shm is an error
    here, not a SIGBUS at the first write)."""
    descriptor, path = tempfile.mkstemp(prefix="npllama-shard-", dir=SHARED_DIRECTORY)
    try:
        os.posix_fallocate(descriptor, 0, size)
    except OSError as error:
        os.remove(path)
        raise HelperError(f"no room for {size / 2**20:.0f} MiB of shard buffers in {SHARED_DIRECTORY} "
                          f"({error.strerror}); enlarge it or set NPLLAMA_WORKERS=1") from None
    finally:
        os.close(descriptor)
    return path


def _map(path, layout):
    """name -> array views into the file at path."""
    offsets, size = _offsets(layout)
    buffer = np.memmap(path, dtype=np.uint8, mode="r+", shape=(size,))
    return {name: np.ndarray(shape, dtype, buffer=buffer, offset=offset)
            for (name, shape, dtype), offset in zip(layout, offsets)}


def _send(stream, message):
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(struct.pack("<Q", len(data)) + data)
    stream.flush()


def _receive(stream):
    header = stream.read(8)
    if len(header) < 8:
        raise EOFError("the other side closed the pipe")
    return pickle.loads(stream.read(struct.unpack("<Q", header)[0]))


class ShardPool:
    """The main process's side: the helper processes and the shared arrays they read and write.

    Any failure during a step closes the pool (a helper may have an answer left unread); the next
    step starts a new one."""

    def __init__(self, helpers):
        package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, NPLLAMA_DEVICE="cpu", NPLLAMA_WORKERS="1", OPENBLAS_NUM_THREADS="1",
                   OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        command = [sys.executable, "-c", "from npllama.shards import serve; serve()"]
        # cwd: `python -c` imports from the working directory first; this one holds this npllama.
        self.helpers = [subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                                         cwd=package_parent) for _ in range(helpers)]
        self.owner = os.getpid()  # a forked child must not talk to its parent's helpers
        self.layout = self.params = self.grads = None
        self.lock = threading.Lock()

    @property
    def closed(self):
        return not self.helpers

    def run(self, params, config, shards, compute):
        """compute(shard) -> (loss, grads) for shards[0] here, the others in the helpers.
        A shard is (tokens, targets, dloss). Returns the list of losses and the sum of the gradients."""
        with self.lock:  # one step at a time: each helper answers in the order it was asked
            if self.closed or len(shards) - 1 > len(self.helpers):
                raise HelperError(f"this pool has {len(self.helpers)} helpers for {len(shards) - 1} shards")
            try:
                return self._run(params, config, shards, compute)
            except BaseException:
                self.close(wait=False)
                raise

    def _run(self, params, config, shards, compute):
        self._share(params)
        busy = self.helpers[:len(shards) - 1]
        for helper, shard in zip(busy, shards[1:]):
            self._ask(helper, ("shard", config, *shard))
        with backend.single_threaded_blas():
            loss, grads = compute(shards[0])
        losses = [loss]
        for helper, helper_grads in zip(busy, self.grads):
            losses.append(self._answer(helper))
            for name, grad in grads.items():
                grad += helper_grads[name]
        return losses, grads

    def _share(self, params):
        """Copy the parameters into shared memory, first laying it out anew if their shapes changed.

        The files are removed as soon as every helper has mapped them: nothing is left behind in
        /dev/shm, however the processes end."""
        layout = [(name, array.shape, array.dtype.str) for name, array in params.items()]
        if layout != self.layout:
            self.layout = self.params = self.grads = None
            size = _offsets(layout)[1]
            paths = []
            try:
                paths = [_new_file(size) for _ in range(1 + len(self.helpers))]
                for helper, grads_path in zip(self.helpers, paths[1:]):
                    self._ask(helper, ("layout", paths[0], grads_path, layout))
                for helper in self.helpers:
                    self._answer(helper)
                self.params, self.grads = _map(paths[0], layout), [_map(path, layout) for path in paths[1:]]
                self.layout = layout
            finally:
                for path in paths:
                    os.remove(path)
        for name, array in params.items():
            self.params[name][...] = array

    def _ask(self, helper, message):
        try:
            _send(helper.stdin, message)
        except OSError:  # a broken pipe: the helper is gone
            raise HelperError(self._exit_report(helper)) from None

    def _answer(self, helper):
        try:
            status, value = _receive(helper.stdout)
        except (EOFError, OSError, pickle.UnpicklingError):
            raise HelperError(self._exit_report(helper)) from None
        if status == "error":
            raise HelperError(f"a shard helper process failed:\n{value}")
        return value

    @staticmethod
    def _exit_report(helper):
        try:
            code = helper.wait(timeout=1)
        except subprocess.TimeoutExpired:
            return f"shard helper process {helper.pid} stopped answering"
        reason = f"signal {-code}" if code < 0 else f"exit code {code}"
        return f"shard helper process {helper.pid} ended ({reason})"

    def close(self, wait=True):
        """Stop the helpers: at the end of their input when wait (they finish what they are doing),
        at once otherwise (after a failed step nobody will read their answers)."""
        helpers, self.helpers = self.helpers, []
        self.layout = self.params = self.grads = None
        for helper in helpers:
            try:
                helper.stdin.close()
            except OSError:  # a dead helper: the last message could not be flushed
                pass
            if not wait:
                helper.kill()
        for helper in helpers:
            try:
                helper.wait(timeout=5)
            except subprocess.TimeoutExpired:
                helper.kill()
                helper.wait()
            helper.stdout.close()


_pool = None


def pool(helpers):
    """The process's pool, with this many helpers (started on first use, and again after a failure,
    a change in the number asked for, or a fork)."""
    global _pool
    if _pool is None or _pool.closed or _pool.owner != os.getpid() or len(_pool.helpers) != helpers:
        if _pool is not None and _pool.owner == os.getpid():
            _pool.close()
        _pool = ShardPool(helpers)
    return _pool


@atexit.register
def _close_pool():
    if _pool is not None and _pool.owner == os.getpid():
        _pool.close()


def serve():
    """A helper's loop: read messages from stdin, compute shards, answer on stdout."""
    from . import model
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    backend.use("cpu")  # also tunes malloc for this process
    requests, replies = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # a stray print must not corrupt the replies
    params = grads = None
    while True:
        try:
            message = _receive(requests)
        except EOFError:
            return
        try:
            if message[0] == "layout":
                _, params_path, grads_path, layout = message
                params, grads = _map(params_path, layout), _map(grads_path, layout)
                _send(replies, ("mapped", None))
                continue
            _, config, tokens, targets, dloss = message
            loss, shard_grads = model.shard_loss_and_grads(params, config, tokens, targets, dloss)
            for name, grad in shard_grads.items():
                grads[name][...] = grad
            _send(replies, ("done", loss))
        except Exception:  # reported to the main process, which raises it
            _send(replies, ("error", traceback.format_exc(limit=-3)))
