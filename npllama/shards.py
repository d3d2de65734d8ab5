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

import numpy as np

ALIGNMENT = 64  # bytes: each array starts on a cache line
SHARED_DIRECTORY = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()  # RAM-backed on Linux


class SharedArrays:
    """name -> array views into one memory-mapped file, laid out from (name, shape, dtype) triples."""

    def __init__(self, path, layout, create):
        offsets, size = [], 0
        for _, shape, dtype in layout:
            offsets.append(size)
            nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
            size += (nbytes + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT
        self.buffer = np.memmap(path, dtype=np.uint8, mode="w+" if create else "r+", shape=(max(size, 1),))
        self.arrays = {name: np.ndarray(shape, dtype, buffer=self.buffer, offset=offset)
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
                   OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join(filter(None, [package_parent, os.environ.get("PYTHONPATH")])))
        command = [sys.executable, "-c", "from npllama.shards import serve; serve()"]
        self.helpers = [subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
                        for _ in range(helpers)]
        self.layout = None
        self.lock = threading.Lock()
        atexit.register(self.close)

    @property
    def closed(self):
        return not self.helpers

    def _share(self, params):
        """Copy the parameters into shared memory, first laying it out anew if their shapes changed.

        The files are removed as soon as every helper has mapped them: nothing is left behind in
        /dev/shm, however the processes end."""
        layout = [(name, array.shape, array.dtype.str) for name, array in params.items()]
        if layout != self.layout:
            paths = [_new_file() for _ in range(1 + len(self.helpers))]
            try:
                self.params = SharedArrays(paths[0], layout, create=True).arrays
                self.grads = [SharedArrays(path, layout, create=True).arrays for path in paths[1:]]
                for helper, grads_path in zip(self.helpers, paths[1:]):
                    _send(helper.stdin, ("layout", paths[0], grads_path, layout))
                for helper in self.helpers:
                    _receive(helper.stdout)
                self.layout = layout
            finally:
                for path in paths:
                    os.remove(path)
        for name, array in params.items():
            self.params[name][...] = array

    def run(self, params, config, shards, compute):
        """compute(shard) -> (loss, grads) for shards[0] here, the others in the helpers.
        A shard is (tokens, targets, dloss). Returns the losses and the sum of the gradients."""
        with self.lock:  # one step at a time: each helper answers in the order it was asked
            try:
                return self._run(params, config, shards, compute)
            except BaseException:
                self.close()
                raise

    def _run(self, params, config, shards, compute):
        self._share(params)
        busy = self.helpers[:len(shards) - 1]
        for helper, shard in zip(busy, shards[1:]):
            _send(helper.stdin, ("shard", config, *shard))
        loss, grads = compute(shards[0])
        losses = [loss]
        for helper, helper_grads in zip(busy, self.grads):
            try:
                status, value = _receive(helper.stdout)
            except EOFError:
                status, value = "error", f"process {helper.pid} exited with code {helper.poll()}"
            if status == "error":
                raise RuntimeError(f"a shard helper process failed: {value}")
            losses.append(value)
            for name, grad in grads.items():
                grad += helper_grads[name]
        return losses, grads

    def close(self):
        for helper in self.helpers:
            helper.stdin.close()  # end of input: the helper returns from serve()
        for helper in self.helpers:
            try:
                helper.wait(timeout=5)
            except subprocess.TimeoutExpired:  # busy with a shard whose answer nobody will read
                helper.kill()
                helper.wait()
            helper.stdout.close()
        self.helpers = []


def _new_file():
    descriptor, path = tempfile.mkstemp(prefix="npllama-shard-", dir=SHARED_DIRECTORY)
    os.close(descriptor)
    return path


_pools = {}


def pool(helpers):
    """The process-wide pool with this many helpers (started on first use, again after a failure)."""
    if helpers not in _pools or _pools[helpers].closed:
        _pools[helpers] = ShardPool(helpers)
    return _pools[helpers]


def serve():
    """A helper's loop: read messages from stdin, compute shards, answer on stdout."""
    from . import backend, model
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
        if message[0] == "layout":
            _, params_path, grads_path, layout = message
            params = SharedArrays(params_path, layout, create=False).arrays
            grads = SharedArrays(grads_path, layout, create=False).arrays
            _send(replies, ("mapped", None))
            continue
        _, config, tokens, targets, dloss = message
        try:
            loss, shard_grads = model.shard_loss_and_grads(params, config, tokens, targets, dloss)
            for name, grad in shard_grads.items():
                grads[name][...] = grad
            _send(replies, ("done", loss))
        except Exception as error:  # reported to the main process, which raises it
            _send(replies, ("error", f"{type(error).__name__}: {error}"))
