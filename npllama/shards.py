"""Data parallelism on the CPU: the shards of one batch computed at the same time, one per core.

NumPy runs elementwise work on one core, and it holds Python's GIL through its many small reductions,
so threads of one process keep waiting for each other; processes do not. The main process computes
the first shard itself while each helper process (one per further core, started on first use,
running `serve`) computes one more. Parameters and gradients travel through memory-mapped
files in shared memory: each step copies the parameters in once, each helper writes its shard's
gradients there, and the main process adds them to its own. Small messages (the config, the shard's
tokens and targets, the loss) go through the helpers' stdin and stdout as pickles.
"""
import atexit
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading

import numpy as np

ALIGNMENT = 64  # bytes: each array starts on a cache line


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
    """The main process's side: helper processes and the shared files they read and write."""

    def __init__(self, helpers):
        self.directory = tempfile.mkdtemp(prefix="npllama-shards-",
                                          dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
        package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, NPLLAMA_DEVICE="cpu", NPLLAMA_WORKERS="1", OPENBLAS_NUM_THREADS="1",
                   OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join(filter(None, [package_parent, os.environ.get("PYTHONPATH")])))
        command = [sys.executable, "-c", "from npllama.shards import serve; serve()"]
        self.helpers = [subprocess.Popen(command, stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, env=env) for _ in range(helpers)]
        self.layout = None
        self.lock = threading.Lock()
        atexit.register(self.close)

    def _share(self, params):
        """Copy the parameters into the shared file (re-laying it out when their shapes change)."""
        layout = [(name, array.shape, array.dtype.str) for name, array in params.items()]
        if layout != self.layout:
            self.layout = layout
            self.params = SharedArrays(os.path.join(self.directory, "params"), layout, create=True).arrays
            self.grads = [SharedArrays(os.path.join(self.directory, f"grads{i}"), layout, create=True).arrays
                          for i in range(len(self.helpers))]
            for i, helper in enumerate(self.helpers):
                _send(helper.stdin, ("layout", self.directory, i, layout))
        for name, array in params.items():
            self.params[name][...] = array

    def run(self, params, config, shards, compute):
        """compute(shard) -> (loss, grads) for shards[0] here, the others in the helpers.
        A shard is (tokens, targets, dloss). Returns the losses and the sum of the gradients."""
        with self.lock:  # one step at a time: the helpers answer in the order they were asked
            self._share(params)
            busy = self.helpers[:len(shards) - 1]
            for helper, shard in zip(busy, shards[1:]):
                try:
                    _send(helper.stdin, ("shard", config, *shard))
                except BrokenPipeError:
                    raise RuntimeError(f"a shard helper process ({helper.pid}) has exited "
                                       f"with code {helper.poll()}") from None
            try:
                loss, grads = compute(shards[0])
            finally:  # every helper's answer is read, so the next step's answers are its own
                replies = [self._reply(helper) for helper in busy]
        for status, value in replies:
            if status == "error":
                raise RuntimeError(f"a shard helper process failed: {value}")
        for i, _ in enumerate(replies):
            for name, grad in grads.items():
                grad += self.grads[i][name]
        return [loss] + [value for _, value in replies], grads

    @staticmethod
    def _reply(helper):
        try:
            return _receive(helper.stdout)
        except EOFError:
            return "error", f"process {helper.pid} exited with code {helper.poll()}"

    def close(self):
        for helper in self.helpers:
            if helper.poll() is None:
                helper.stdin.close()  # end of input: the helper returns from serve()
                try:
                    helper.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    helper.kill()
        self.helpers = []
        shutil.rmtree(self.directory, ignore_errors=True)


_pools = {}


def pool(helpers):
    """The process-wide pool with this many helpers (started on first use)."""
    if helpers not in _pools:
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
            _, directory, index, layout = message
            params = SharedArrays(os.path.join(directory, "params"), layout, create=False).arrays
            grads = SharedArrays(os.path.join(directory, f"grads{index}"), layout, create=False).arrays
            continue
        _, config, tokens, targets, dloss = message
        try:
            loss, shard_grads = model.shard_loss_and_grads(params, config, tokens, targets, dloss)
            for name, grad in shard_grads.items():
                grads[name][...] = grad
            _send(replies, ("done", loss))
        except Exception as error:  # reported to the main process, which raises it
            _send(replies, ("error", f"{type(error).__name__}: {error}"))

