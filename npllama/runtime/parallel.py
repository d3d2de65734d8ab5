"""Summing gradients across workers: the one seam of data parallelism.

A training step splits its batch into shards, each weighted so that the shards' gradients add up to
the whole batch's; `run(task, arrays, shards, trained)` computes `task(arrays, *shard) -> (loss, grads)`
for every shard and returns the losses and the sum of the gradients. Which worker computes which shard
is the implementation's business; what the sum is depends only on the shards, added in their order,
so a run is exact for a given shard count (the run's `workers` setting) on any machine:
    OneProcess      every shard in this process, one after the other (a GPU; one core)
    Workers         on the CPU, one process per shard: this one and the helpers of the process's
                    ShardPool (below), looked up at every step (a failed step closes it)
    (across processes and machines, MPI and NCCL sum the ranks' gradients: distributed.py, zero.py)
`workers(count)` gives the one for a run. The arrays whose gradients are not asked for (`trained`)
are the run's frozen ones, a LoRA run's base: they must not change while the run lasts.
The task is a module-level function, passed to helpers by name (pickle), so this module knows nothing
of the model.

The shard pool. NumPy runs elementwise work on one core, and it holds Python's GIL through its many
small reductions, so threads of one process keep waiting for each other; processes do not. The main
process computes the first shard itself while each helper process (started on first use, running
`serve`) computes one more, each with BLAS on one thread. The arrays and the gradients travel through
shared memory (files in /dev/shm, mapped by every process and then removed): each step copies the
trained arrays in (a run's frozen ones once), each helper writes its shard's gradients there, and the
main process adds them to its own. Small messages (the task, the shard, the loss) go through the helpers' stdin and stdout as
pickles.
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
import weakref

import numpy as np

from .. import backend
from ..errors import UserError, setting
from . import cpu, distributed

ALIGNMENT = 64  # bytes: each array starts on a cache line
SHARED_DIRECTORY = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()  # RAM-backed on Linux


class HelperError(UserError, RuntimeError):
    """A helper process failed or exited (message fit for the user)."""


class OneProcess:
    """Every shard computed here, in order: the same sum as the shard pool's (trained is not needed:
    the gradients stay where they are computed)."""

    def run(self, task, arrays, shards, trained=None):
        losses, total = [], None
        for shard in shards:
            loss, grads = task(arrays, *shard)
            losses.append(loss)
            if total is None:
                total = grads
            else:
                for name, grad in grads.items():
                    total[name] += grad
        return losses, total


def default_count():
    """The shard count a run records when none is given: NPLLAMA_WORKERS when set, else one shard per
    usable core on the CPU (where BLAS's threads can be set to one each; the cores shared by an MPI
    job's ranks on this machine), else one."""
    requested = os.environ.get("NPLLAMA_WORKERS", "").strip()
    if requested:
        if not requested.isascii() or not requested.isdigit() or int(requested) < 1:
            raise UserError(f"NPLLAMA_WORKERS must be a positive integer, got {requested!r}")
        return int(requested)
    if backend.device() != "cpu" or not cpu.blas_threads_settable():
        return 1
    return cpu.cores_per_process(distributed.world().local_size)


def workers(count):
    """The seam for a run of `count` shards a batch: Workers on the CPU, OneProcess for one shard, on
    a GPU, or where BLAS's thread count cannot be set (the sum is the same)."""
    if count == 1 or backend.device() != "cpu" or not cpu.blas_threads_settable():
        return OneProcess()
    return Workers(count)


class Workers:
    """One run's side of the CPU's shard pool: its shards computed by this process and count − 1 helpers."""

    def __init__(self, count):
        self.count = count

    def run(self, task, arrays, shards, trained=None):
        """As OneProcess.run; the arrays outside `trained` are this run's frozen ones (module docstring)."""
        if len(shards) == 1:  # nothing to share: this process, with all its BLAS threads
            return OneProcess().run(task, arrays, shards)
        return pool(self.count - 1).run(task, arrays, shards, trained, run=self)


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
                          f"({error.strerror}); enlarge it or use one worker ({setting('workers')} 1)") from None
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

    Any failure during a step closes the pool (a helper may have an answer left unread); pool() then
    starts a new one."""

    def __init__(self, helpers):
        package_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ, NPLLAMA_DEVICE="cpu", OPENBLAS_NUM_THREADS="1",
                   OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        command = [sys.executable, "-c", "from npllama.runtime.parallel import serve; serve()"]
        # cwd: `python -c` imports from the working directory first; this one holds this npllama.
        self.helpers = [subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                                         cwd=package_parent) for _ in range(helpers)]
        self.owner = os.getpid()  # a forked child must not talk to its parent's helpers
        self.layout = self.arrays = self.grads = None
        self.frozen = (None, {})  # (the run they belong to, name -> a weak reference to the array copied in)
        self.lock = threading.Lock()

    @property
    def closed(self):
        return not self.helpers

    def run(self, task, arrays, shards, trained=None, run=None):
        """task(arrays, *shard) -> (loss, grads) for shards[0] here, the others in the helpers (at most
        one each). arrays: name -> NumPy array; trained: the names whose gradients come back (default
        all). Given the run they belong to, the other arrays are that run's frozen ones: copied in once
        (again only when another array takes a name's place). Returns the list of losses and the sum of
        the gradients, added in the shards' order."""
        with self.lock:  # one step at a time: each helper answers in the order it was asked
            if self.closed or len(shards) - 1 > len(self.helpers):
                raise HelperError(f"this pool has {len(self.helpers)} helpers for {len(shards) - 1} shards")
            try:
                return self._run(task, arrays, shards, list(arrays) if trained is None else list(trained), run)
            except BaseException:
                self.close(wait=False)
                raise

    def _run(self, task, arrays, shards, trained, run):
        self._share(arrays, trained, run)
        busy = self.helpers[:len(shards) - 1]
        for helper, shard in zip(busy, shards[1:]):
            self._ask(helper, ("task", task, shard))
        with cpu.single_threaded_blas():
            loss, grads = task(arrays, *shards[0])
        losses = [loss]
        for helper, helper_grads in zip(busy, self.grads):
            losses.append(self._answer(helper))
            for name, grad in grads.items():
                grad += helper_grads[name]
        return losses, grads

    def _share(self, arrays, trained, run):
        """Copy the arrays into shared memory, first laying it out anew if their shapes changed.

        The files are removed as soon as every helper has mapped them: nothing is left behind in
        /dev/shm, however the processes end."""
        layout = [(name, array.shape, array.dtype.str) for name, array in arrays.items()]
        grads_layout = [entry for entry in layout if entry[0] in set(trained)]
        if (layout, grads_layout) != self.layout:
            self.layout = self.arrays = self.grads = None
            self.frozen = (None, {})
            paths = []
            try:
                paths = [_new_file(_offsets(layout)[1])] + [_new_file(_offsets(grads_layout)[1])
                                                             for _ in self.helpers]
                for helper, grads_path in zip(self.helpers, paths[1:]):
                    self._ask(helper, ("layout", paths[0], layout, grads_path, grads_layout))
                for helper in self.helpers:
                    self._answer(helper)
                self.arrays, self.grads = _map(paths[0], layout), [_map(path, grads_layout) for path in paths[1:]]
                self.layout = (layout, grads_layout)
            finally:
                for path in paths:
                    os.remove(path)
        trained = set(trained)
        frozen_run, frozen = self.frozen
        if run is None or run is not frozen_run:
            frozen = {}
        for name, array in arrays.items():
            if name in trained or run is None or name not in frozen or frozen[name]() is not array:
                self.arrays[name][...] = array
                if name not in trained:
                    frozen[name] = weakref.ref(array)
        self.frozen = (run, frozen)

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
        self.layout = self.arrays = self.grads = None
        self.frozen = (None, {})
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
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    backend.use("cpu")
    cpu.keep_freed_memory()
    requests, replies = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # a stray print must not corrupt the replies
    arrays = grads = None
    while True:
        try:
            message = _receive(requests)
        except EOFError:
            return
        try:
            if message[0] == "layout":
                _, arrays_path, layout, grads_path, grads_layout = message
                arrays, grads = _map(arrays_path, layout), _map(grads_path, grads_layout)
                _send(replies, ("mapped", None))
                continue
            _, task, shard = message
            loss, shard_grads = task(arrays, *shard)
            for name, grad in shard_grads.items():
                grads[name][...] = grad
            _send(replies, ("done", loss))
        except Exception:  # reported to the main process, which raises it
            _send(replies, ("error", traceback.format_exc(limit=-3)))
