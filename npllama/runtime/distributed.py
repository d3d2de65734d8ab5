"""Training across processes and machines: the ranks `mpiexec` starts, and what they send each other.

    mpiexec -n N python3 cli.py train ...        (multi-node: the same, with mpiexec's --hostfile)

starts N ranks, found through mpi4py's COMM_WORLD. Rank 0 owns the run's files and sends the other
ranks what they need; every rank draws its own batches and computes their gradient, and the ranks'
gradients are summed (all-reduce) so that each applies the same update to the same parameters. This
is the outer level of the reduction seam: within a rank, parallel.py's workers sum its shards first.

A World is what one process sees of the job:
    Alone      a process started without mpiexec (or as its only rank): every collective is the identity
    MpiWorld   the ranks of COMM_WORLD, each with BLAS on its share of its machine's cores. Python objects travel pickled (bcast, gather); arrays travel
               as buffers: NumPy ones with MPI, CuPy ones with NCCL (one GPU a rank, the NCCL id sent
               to every rank over MPI), through the same three collectives:
                   sum(buffer)                   all-reduce in place: every rank gets Σ over ranks
                   reduce_scatter(buffer, part)  rank r gets part r of Σ over ranks (parts of equal size)
                   all_gather(buffer)            every rank's part r of buffer, from rank r, to all
Sums over two ranks are exact in any order (a + b = b + a); over more, MPI's reduction order may round
differently from one process adding the same gradients.

FlatLayout lays named arrays end to end in one buffer, so that a collective moves them all at once.
"""
import os

import numpy as np

from .. import backend
from ..errors import UserError
from . import cpu

# What launchers put in each rank's environment: Open MPI, MPICH/Intel MPI (Hydra), PMIx, Slurm's srun.
# (Not Slurm's SLURM_NTASKS: a batch script sets it for the plain processes it starts too.)
SIZE_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE")
RANK_VARIABLES = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")
CHUNK_BYTES = 1 << 30  # one message's most: MPI counts are 32-bit ints in many builds


class DistributedError(UserError):
    """The job cannot run as launched (message is one line, fit for the user)."""


class Stopped(DistributedError):
    """Raised on the other ranks when rank 0 stops the job with an error: rank 0 says why, they end quietly."""


def launched_size(environ=os.environ):
    """The number of ranks a launcher started this process among (1 without one)."""
    return _launcher_number(SIZE_VARIABLES, environ, 1)


def launched_rank(environ=os.environ):
    """This process's rank as its launcher numbered it (0 without one), known before MPI starts."""
    return _launcher_number(RANK_VARIABLES, environ, 0) if launched_size(environ) > 1 else 0


def _launcher_number(names, environ, default):
    for name in names:
        value = environ.get(name, "")
        if value.isdigit():
            return int(value)
    return default


_world = None


def world():
    """This process's World: MpiWorld when a launcher started it among several ranks, else Alone."""
    global _world
    if _world is None:
        size = launched_size()
        if size > 1:
            try:
                from mpi4py import MPI
            except ImportError:
                raise DistributedError(f"started as one of {size} MPI ranks, but mpi4py is not installed: "
                                       "pip install 'npllama[mpi]'") from None
            _world = MpiWorld(MPI)
        else:
            _world = Alone()
    return _world


def speaks_for_the_job():
    """Whether this process reports the job's errors and reads its input files: rank 0 (as its launcher
    numbered it, before MPI starts), or a process started alone."""
    return _world.is_root if _world is not None else launched_rank() == 0


def this_rank():
    """This process's rank in its job (0 alone), before MPI starts too."""
    return _world.rank if _world is not None else launched_rank()


class Alone:
    """One process: the job is this process, every collective returns what it was given."""
    rank, size, local_rank, local_size = 0, 1, 0, 1
    is_root = True

    def broadcast(self, value):
        return value

    def gather(self, value):
        return [value]

    def all_gather_objects(self, value):
        return [value]

    def total(self, value):
        return value

    def broadcast_arrays(self, arrays):
        return arrays

    def sum(self, buffer):
        pass

    def reduce_scatter(self, buffer, part):
        part[...] = buffer[:part.size]

    def all_gather(self, buffer):
        pass

    def gather_parts(self, part, buffer):
        buffer[:part.size] = part

    def scatter_parts(self, buffer, part):
        part[...] = buffer[:part.size]

    def check_same(self, what, value):
        pass

    def agree(self, action):
        return action()


class MpiWorld:
    """The ranks of MPI's COMM_WORLD (module docstring)."""

    def __init__(self, mpi, comm=None):
        self.mpi = mpi
        self.comm = comm or mpi.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.is_root = self.rank == 0
        local = self.comm.Split_type(mpi.COMM_TYPE_SHARED)  # the ranks on this machine
        self.local_rank, self.local_size = local.Get_rank(), local.Get_size()
        local.Free()
        cpu.set_blas_threads(cpu.cores_per_process(self.local_size))  # the ranks here share the cores
        self._nccl = None

    # ---- Python objects ---------------------------------------------------------------------------
    def broadcast(self, value):
        """Rank 0's value, on every rank."""
        return self.comm.bcast(value, root=0)

    def gather(self, value):
        """Every rank's value, in rank order, on rank 0 (None elsewhere)."""
        return self.comm.gather(value, root=0)

    def all_gather_objects(self, value):
        return self.comm.allgather(value)

    def total(self, value):
        """Σ over ranks of a number, in float64 (int for ints), on every rank."""
        return self.comm.allreduce(value, op=self.mpi.SUM)

    def check_same(self, what, value):
        """Stop the job, on every rank, unless every rank has the same value (what: its name, for the
        message rank 0 raises; the others raise Stopped)."""
        values = self.all_gather_objects(value)
        differing = [rank for rank, other in enumerate(values) if other != values[0]]
        if not differing:
            return
        if self.is_root:
            raise DistributedError(f"rank {differing[0]} was started with other {what} than rank 0 "
                                   f"({_difference(values[0], values[differing[0]])}): start every rank "
                                   "with the same command")
        raise Stopped()

    def agree(self, action):
        """action() on every rank (work that may fail on one rank alone: its device, its files), returning
        its result; should it fail on any rank, every rank stops: rank 0 raises its own error, or one
        naming the rank that failed and why; the others raise Stopped."""
        try:
            result, failure = action(), None
        except Exception as error:  # re-raised below, once every rank knows
            result, failure = None, error
        failures = self.all_gather_objects(None if failure is None else str(failure))
        failed = [rank for rank, message in enumerate(failures) if message is not None]
        if not failed:
            return result
        if not self.is_root:
            raise Stopped()
        if failure is not None:
            raise failure
        raise DistributedError(f"rank {failed[0]}: {failures[failed[0]]}")

    # ---- arrays -------------------------------------------------------------------------------------
    def broadcast_arrays(self, arrays):
        """Rank 0's name -> host array dict, on every rank (the others' argument is ignored)."""
        layout = self.broadcast([(name, array.shape, array.dtype.str) for name, array in arrays.items()]
                                if self.is_root else None)
        received = {}
        for name, shape, dtype in layout:
            array = np.ascontiguousarray(backend.to_host(arrays[name])) if self.is_root else np.empty(shape, dtype)
            flat = array.reshape(-1).view(np.uint8)
            for start in range(0, flat.size, CHUNK_BYTES):
                self.comm.Bcast(flat[start:start + CHUNK_BYTES], root=0)
            received[name] = array
        return received

    def _arrays(self, buffer):
        """The collectives for this buffer's device: MPI for host arrays, NCCL for CuPy ones."""
        if backend.array_module(buffer) is np:
            return _MpiArrays(self.comm, self.mpi)
        if self._nccl is None:
            self._nccl = NcclArrays(self.comm)
        return self._nccl

    def sum(self, buffer):
        self._arrays(buffer).sum(buffer)

    def reduce_scatter(self, buffer, part):
        self._arrays(buffer).reduce_scatter(buffer, part)

    def all_gather(self, buffer):
        self._arrays(buffer).all_gather(buffer, buffer.size // self.size)

    def gather_parts(self, part, buffer):
        """Rank r's part to buffer's part r, on rank 0 (a checkpoint of what the ranks hold apart)."""
        self.comm.Gather(backend.to_host(part), buffer if self.is_root else None, root=0)

    def scatter_parts(self, buffer, part):
        """Rank 0's buffer's part r to rank r's part."""
        received = np.empty(part.shape, part.dtype)
        self.comm.Scatter(buffer if self.is_root else None, received, root=0)
        part[...] = backend.array_module(part).asarray(received)


def _difference(ours, theirs):
    """The first setting two dicts disagree on, said briefly (anything else: that they differ)."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        for name in sorted(set(ours) | set(theirs)):
            if ours.get(name) != theirs.get(name):
                return f"{name}: {theirs.get(name)!r} instead of {ours.get(name)!r}"
    return "they differ"


class _MpiArrays:
    """The collectives over host (NumPy) buffers."""

    def __init__(self, comm, mpi):
        self.comm, self.mpi = comm, mpi

    def sum(self, buffer):
        self.comm.Allreduce(self.mpi.IN_PLACE, buffer, op=self.mpi.SUM)

    def reduce_scatter(self, buffer, part):
        self.comm.Reduce_scatter_block(buffer, part, op=self.mpi.SUM)

    def all_gather(self, buffer, count):
        self.comm.Allgather(self.mpi.IN_PLACE, buffer)


class NcclArrays:
    """The collectives over GPU (CuPy) buffers, through NCCL: one communicator for the job, made from a
    unique id that rank 0 draws and sends to the others over MPI (as llm.c does)."""

    def __init__(self, comm, nccl=None):
        if nccl is None:
            from cupy.cuda import nccl
        self.nccl = nccl
        unique_id = comm.bcast(nccl.get_unique_id() if comm.Get_rank() == 0 else None, root=0)
        self.communicator = nccl.NcclCommunicator(comm.Get_size(), unique_id, comm.Get_rank())
        self.rank = comm.Get_rank()

    def _type(self, buffer):
        types = {np.dtype(np.float32): self.nccl.NCCL_FLOAT32, np.dtype(np.float64): self.nccl.NCCL_FLOAT64}
        return types[np.dtype(buffer.dtype)]

    @staticmethod
    def _stream():
        import cupy
        return cupy.cuda.get_current_stream().ptr

    def sum(self, buffer):
        self.communicator.allReduce(buffer.data.ptr, buffer.data.ptr, buffer.size, self._type(buffer),
                                    self.nccl.NCCL_SUM, self._stream())

    def reduce_scatter(self, buffer, part):
        self.communicator.reduceScatter(buffer.data.ptr, part.data.ptr, part.size, self._type(buffer),
                                        self.nccl.NCCL_SUM, self._stream())

    def all_gather(self, buffer, count):
        """In place: this rank's part already sits at its place in buffer."""
        own = buffer[self.rank * count:(self.rank + 1) * count]
        self.communicator.allGather(own.data.ptr, buffer.data.ptr, count, self._type(buffer), self._stream())


def use_local_gpu(world):
    """On CUDA, one GPU per rank of a machine: the local rank's (modulo the GPUs there are). Before any
    array is made: NCCL refuses a communicator whose ranks share a GPU."""
    if world.size > 1 and backend.device() == "cuda":
        import cupy
        cupy.cuda.Device(world.local_rank % cupy.cuda.runtime.getDeviceCount()).use()


class FlatLayout:
    """Named arrays laid end to end in one 1-D buffer of `size` elements: `total` of them, padded with
    zeros up to a multiple of `parts` so that each of the ranks' parts has the same `part_size`.
    Part r covers elements [r·part_size, (r + 1)·part_size)."""

    def __init__(self, shapes, parts=1):
        self.shapes = dict(shapes)
        self.offsets, offset = {}, 0
        for name, shape in self.shapes.items():
            self.offsets[name] = offset
            offset += int(np.prod(shape, dtype=np.int64))
        self.total = offset
        self.part_size = -(-offset // parts)
        self.size = self.part_size * parts

    def _span(self, name):
        start = self.offsets[name]
        return start, start + int(np.prod(self.shapes[name], dtype=np.int64))

    def views(self, buffer):
        """name -> the array's view into buffer."""
        return {name: buffer[slice(*self._span(name))].reshape(shape) for name, shape in self.shapes.items()}

    def pack(self, arrays, buffer):
        """Copy the arrays into buffer (the padding stays as it is)."""
        for name in self.shapes:
            start, stop = self._span(name)
            buffer[start:stop] = arrays[name].reshape(-1)

    def unpack(self, buffer):
        """Host copies of the arrays in buffer (a checkpoint's)."""
        host = backend.to_host(buffer)
        return {name: np.array(view) for name, view in self.views(host).items()}

    def pieces(self, part):
        """The arrays' pieces inside part `part`: [(name, start, stop)], element ranges of each array's
        flattened values (only those that overlap the part, in order)."""
        low, high = part * self.part_size, (part + 1) * self.part_size
        found = []
        for name in self.shapes:
            start, stop = self._span(name)
            if start < high and stop > low:
                found.append((name, max(start, low) - start, min(stop, high) - start))
        return found

