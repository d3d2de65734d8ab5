"""Training across MPI ranks (runtime/distributed.py, zero.py), run for real with `mpiexec -n 2`:
2 ranks × b windows give one process's steps over the same 2b windows bit for bit (a sum of two
gradients is exact in any order); ZeRO stage 1 equals stage 0 (bit for bit without clipping, to fp32
rounding of the norm with it); a CLI run whose rank is killed ends with one line from rank 0, its
checkpoint intact, and resumes to the uninterrupted run's losses; bad launches are one line each.
Skipped, with the reason, where mpi4py or mpiexec is missing (the README's setup installs both)."""
import csv
import importlib.util
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from npllama import adamw, train
from npllama.runtime import distributed, parallel
from tests import mpi_steps
from tests.conftest import ROOT

MPIEXEC = shutil.which("mpiexec")
if importlib.util.find_spec("mpi4py") is None:
    MISSING = "mpi4py is not installed (pip install -r requirements.txt installs it with Open MPI)"
else:
    MISSING = None if MPIEXEC else "mpiexec is not on PATH"
needs_mpi = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")

# Open MPI refuses root without these (containers, CI), and more ranks than cores without --oversubscribe.
ENV = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", "NPLLAMA_DEVICE": "cpu",
       "PYTHONPATH": ROOT}
CLI = os.path.join(ROOT, "cli.py")
MODEL = ["--dim", "32", "--n-layers", "2", "--n-heads", "4", "--n-kv-heads", "2", "--hidden", "64", "--context", "32",
         "--batch-size", "2", "--eval-iters", "3", "--sample-tokens", "0", "--workers", "1", "--lr", "3e-3"]


def mpiexec(ranks):
    return [MPIEXEC, "--oversubscribe", "-n", str(ranks)] if _open_mpi() else [MPIEXEC, "-n", str(ranks)]


def _open_mpi():
    version = subprocess.run([MPIEXEC, "--version"], capture_output=True, text=True).stdout
    return "Open MPI" in version or "OpenRTE" in version or "PRRTE" in version or "prterun" in version


def train_command(ranks, out, *flags):
    return [*mpiexec(ranks), sys.executable, CLI, "train", "--data", DATA, "--out", str(out), *MODEL, *flags]


def resume_command(ranks, out, *flags):
    return [*mpiexec(ranks), sys.executable, CLI, "train", "--out", str(out), "--resume", *flags]


DATA = os.path.join(ROOT, "npllama", "corpus", "shakespeare-sample.txt")


def run(command, timeout=240):
    return subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=timeout, cwd=ROOT)


def losses(directory):
    with open(os.path.join(directory, "log.csv")) as file:
        return [(row["step"], row["loss"], row["val_loss"]) for row in csv.DictReader(file)]


def error_lines(result):
    """Lines our program wrote as errors (mpiexec adds its own banner about the exit status)."""
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error:")]


# ---- steps: 2 ranks against one process ---------------------------------------------------------------
@pytest.fixture(scope="module")
def two_rank_steps(tmp_path_factory):
    if MISSING:
        pytest.skip(MISSING)
    out = tmp_path_factory.mktemp("mpi") / "steps.npz"
    result = run([*mpiexec(2), sys.executable, os.path.join(ROOT, "tests", "mpi_steps.py"), str(out), "3", "4"])
    assert result.returncode == 0, result.stdout + result.stderr
    return dict(np.load(out))


def one_process(stage_clip, rows_per_rank=3, steps=4):
    """The same steps in one process: the global batch of 2 × rows_per_rank windows cut into 2 shards."""
    _, clip = stage_clip
    params = mpi_steps.npllama.init_params(mpi_steps.config(), seed=0)
    optimizer = adamw.AdamW(1e-2, (0.9, 0.99), weight_decay=0.1)
    found = []
    for batch in mpi_steps.global_batches(steps, 2 * rows_per_rank):
        found.append(train.optimizer_step(params, mpi_steps.config(), optimizer, [batch], 1e-2, clip, shards=2,
                                          workers=parallel.OneProcess()))
    return [loss for loss, _ in found], [norm for _, norm in found], params


@needs_mpi
@pytest.mark.parametrize("case", ["zero0", "zero0-noclip"])
def test_two_ranks_equal_one_process_with_their_windows_bit_for_bit(two_rank_steps, case):
    expected_losses, expected_norms, expected = one_process(mpi_steps.CASES[case])
    assert list(two_rank_steps[f"{case}/losses"]) == expected_losses
    assert list(two_rank_steps[f"{case}/norms"]) == expected_norms
    for name, value in expected.items():
        assert np.array_equal(two_rank_steps[f"{case}/{name}"], value), name


@needs_mpi
def test_zero1_equals_zero0_bit_for_bit_without_clipping(two_rank_steps):
    """The losses and parameters; the norm, reported but unused, sums its squares in another order."""
    for key in two_rank_steps:
        if key.startswith("zero0-noclip/") and key not in ("zero0-noclip/norms", "zero0-noclip/moment_bytes"):
            assert np.array_equal(two_rank_steps[key], two_rank_steps[key.replace("zero0", "zero1")]), key


@needs_mpi
def test_zero1_splits_adamws_state_across_the_ranks(two_rank_steps):
    whole = two_rank_steps["zero0/moment_bytes"]
    assert whole[0] == whole[1] == 2 * 4 * mpi_steps.npllama.LlamaConfig.num_parameters(mpi_steps.config())
    assert sum(two_rank_steps["zero1/moment_bytes"]) == whole[0]  # each element's moments on one rank only
    assert max(two_rank_steps["zero1/moment_bytes"]) <= whole[0] // 2 + 8  # half each (the last part padded)


@needs_mpi
def test_zero1_equals_zero0_to_fp32_rounding_with_clipping(two_rank_steps):
    """Stage 1 sums the norm's squares in its own order: the clip factor may differ in its last bit."""
    np.testing.assert_allclose(two_rank_steps["zero1/norms"], two_rank_steps["zero0/norms"], rtol=1e-6)
    np.testing.assert_allclose(two_rank_steps["zero1/losses"], two_rank_steps["zero0/losses"], rtol=1e-6)
    for key in two_rank_steps:
        if key.startswith("zero0/") and "/model." in key:
            np.testing.assert_allclose(two_rank_steps[key.replace("zero0", "zero1")], two_rank_steps[key],
                                       rtol=0, atol=1e-6, err_msg=key)


# ---- the CLI under mpiexec -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    if MISSING:
        pytest.skip(MISSING)
    out = tmp_path_factory.mktemp("mpi") / "whole"
    result = run(train_command(2, out, "--max-iters", "24", "--eval-interval", "4"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 MPI ranks × batch 2 × accumulation 1 = global batch of 4 windows" in result.stdout
    assert result.stdout.count("done: step 24") == 1  # rank 0 alone speaks
    return out


def rank_process(rank, out):
    """The pid of the rank of the job training in out (from /proc: its environment names its rank)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as file:
                command = file.read().split(b"\0")
            with open(f"/proc/{pid}/environ", "rb") as file:
                environment = file.read().split(b"\0")
        except OSError:
            continue
        if str(out).encode() in command and ({f"OMPI_COMM_WORLD_RANK={rank}".encode(), f"PMI_RANK={rank}".encode()}
                                              & set(environment)):
            return int(pid)
    return None


@needs_mpi
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finding a rank's process reads /proc (Linux)")
def test_a_killed_rank_ends_the_job_in_one_line_and_the_run_resumes_exactly(tmp_path, uninterrupted):
    out = tmp_path / "killed"
    job = subprocess.Popen(train_command(2, out, "--max-iters", "24", "--eval-interval", "4"), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
    deadline = time.monotonic() + 120
    while not (out / "optimizer.safetensors").exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    victim = rank_process(1, out)
    assert victim is not None and job.poll() is None, "the job ended before its first checkpoint could be seen"
    os.kill(victim, 9)
    stdout, stderr = job.communicate(timeout=120)
    assert job.returncode != 0
    errors = error_lines(subprocess.CompletedProcess([], job.returncode, stdout, stderr))
    assert len(errors) == 1 and errors[0].startswith("Error: the job stopped at step"), stdout + stderr
    assert "is kept" in errors[0] and "--resume" in errors[0]
    checkpoint = train.load_checkpoint(str(out))
    assert checkpoint.state["step"] % 4 == 0 and 0 < checkpoint.state["step"] < 24
    assert checkpoint.state["settings"]["world_size"] == 2 and len(checkpoint.state["rng_states"]) == 2

    result = run(resume_command(2, out))
    assert result.returncode == 0, result.stdout + result.stderr
    assert losses(out) == losses(uninterrupted)


@needs_mpi
def test_zero1_run_matches_zero0_and_resumes_exactly(tmp_path, uninterrupted):
    whole, cut = tmp_path / "zero1", tmp_path / "zero1-cut"
    assert run(train_command(2, whole, "--max-iters", "24", "--eval-interval", "4", "--zero", "1")).returncode == 0
    for (step, loss, val), (_, expected, expected_val) in zip(losses(whole), losses(uninterrupted), strict=True):
        assert float(loss) == pytest.approx(float(expected), rel=1e-5), step
    result = run(train_command(2, cut, "--max-iters", "12", "--eval-interval", "4", "--zero", "1"))
    assert result.returncode == 0, result.stdout + result.stderr
    result = run(resume_command(2, cut, "--max-iters", "24"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert losses(cut) == losses(whole)  # AdamW's parts gathered to the checkpoint and sent back out
    alone = subprocess.run([sys.executable, CLI, "train", "--out", str(cut), "--resume", "--max-iters", "26",
                            "--force"], capture_output=True, text=True, env=ENV, cwd=ROOT)
    assert alone.returncode == 0, alone.stderr  # one process takes the whole state: stage 0
    assert train.load_checkpoint(str(cut)).state["settings"]["zero"] == 0


# ---- bad launches: one line each, nothing written --------------------------------------------------------
@needs_mpi
def test_ranks_started_with_different_flags_are_refused_in_one_line(tmp_path):
    out = tmp_path / "run"
    first, second = train_command(1, out, "--max-iters", "4"), train_command(1, out, "--max-iters", "4", "--lr", "1e-3")
    command = [*first, ":", *second[len(mpiexec(1)) - 2:]]  # MPMD: rank 0 runs the first, rank 1 the second
    result = run(command)
    assert result.returncode != 0
    errors = error_lines(result)
    assert len(errors) == 1 and "rank 1 was started with other flags than rank 0 (--lr: 0.001 instead of 0.003)" in errors[0], errors
    assert not out.exists()


@needs_mpi
def test_a_global_batch_larger_than_the_data_is_refused_in_one_line(tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("To be, or not to be, that is the question. " * 30)
    out = tmp_path / "run"
    command = train_command(2, out, "--max-iters", "4")
    command[command.index("--data") + 1] = str(small)
    command[command.index("--batch-size") + 1] = "20"
    result = run(command)
    assert result.returncode != 0
    errors = error_lines(result)
    assert len(errors) == 1 and "2 ranks × --batch-size 20 windows" in errors[0], errors


@needs_mpi
@pytest.mark.parametrize("flags, fragment", [(["--zero", "2"], "Invalid value for '--zero'"),
                                             (["--lora-alpha", "4"], "give --lora-rank too")])
def test_bad_flags_under_mpiexec_are_said_once(tmp_path, flags, fragment):
    result = run(train_command(2, tmp_path / "run", *flags))
    errors = error_lines(result)
    assert result.returncode != 0 and len(errors) == 1 and fragment in errors[0], result.stdout + result.stderr


@needs_mpi
def test_mpi4py_missing_under_mpiexec_is_said_once(tmp_path):
    without_mpi4py = ("import sys; sys.modules['mpi4py'] = None; sys.argv[0] = 'cli.py'; "
                      "from npllama.cli import main; main()")
    command = train_command(2, tmp_path / "run")
    command[command.index(CLI)] = "-c"
    command.insert(command.index("-c") + 1, without_mpi4py)
    result = run(command)
    errors = error_lines(result)
    assert result.returncode != 0 and 1 <= len(errors) <= 2, result.stdout + result.stderr  # each rank lacks it
    assert all("started as one of 2 MPI ranks, but mpi4py is not installed" in error for error in errors)


@needs_mpi
def test_a_failure_of_one_rank_alone_is_said_by_rank_0_naming_it(tmp_path):
    """Rank 1 alone asks for a device it cannot have: rank 0 names rank 1 and the reason; nothing written."""
    out = tmp_path / "run"
    first = train_command(1, out, "--max-iters", "2")
    second = train_command(1, out, "--max-iters", "2")[len(mpiexec(1)) - 2:]
    second[2:2] = ["env", "NPLLAMA_DEVICE=tpu"]  # after "-n 1": rank 1's environment alone
    result = run([*first, ":", *second])
    errors = error_lines(result)
    assert result.returncode != 0 and len(errors) == 1, result.stdout + result.stderr
    assert errors[0].startswith("Error: rank 1: ") and "tpu" in errors[0]
    assert not out.exists()


@needs_mpi
def test_missing_data_under_mpiexec_is_one_line_from_rank_0(tmp_path):
    command = train_command(2, tmp_path / "run")
    command[command.index("--data") + 1] = str(tmp_path / "nowhere.txt")
    result = run(command)
    errors = error_lines(result)
    assert result.returncode == 2 and len(errors) == 1, result.stdout + result.stderr
    assert "Invalid value for '--data': File" in errors[0] and "does not exist" in errors[0]


def test_zero1_without_mpi_is_refused_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, CLI, "train", "--out", str(tmp_path / "run"), *MODEL, "--zero", "1"],
                            capture_output=True, text=True, env=ENV, cwd=ROOT)
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert "--zero 1 splits AdamW's state across the ranks of an MPI job" in result.stderr
    assert not (tmp_path / "run").exists()


@needs_mpi
def test_resuming_with_another_number_of_ranks_is_refused_or_forced(tmp_path, uninterrupted):
    copy = tmp_path / "copy"
    shutil.copytree(uninterrupted, copy)
    result = subprocess.run([sys.executable, CLI, "train", "--out", str(copy), "--resume", "--max-iters", "28"],
                            capture_output=True, text=True, env=ENV, cwd=ROOT)
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert "trained by 2 rank(s) and is resumed by 1" in result.stderr and "mpiexec -n 2" in result.stderr
    result = subprocess.run([sys.executable, CLI, "train", "--out", str(copy), "--resume", "--max-iters", "28",
                             "--force"], capture_output=True, text=True, env=ENV, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "goes on with 1" in result.stderr
    assert losses(copy)[:24] == losses(uninterrupted) and len(losses(copy)) == 28


# ---- the pieces, without MPI -------------------------------------------------------------------------
def test_flat_layout_cuts_arrays_into_equal_parts():
    layout = distributed.FlatLayout({"a": (2, 3), "b": (5,), "c": (1, 2)}, parts=3)
    assert (layout.total, layout.part_size, layout.size) == (13, 5, 15)
    assert layout.pieces(0) == [("a", 0, 5)]
    assert layout.pieces(1) == [("a", 5, 6), ("b", 0, 4)]
    assert layout.pieces(2) == [("b", 4, 5), ("c", 0, 2)]
    buffer = np.zeros(layout.size)
    arrays = {"a": np.arange(6.0).reshape(2, 3), "b": np.arange(5.0) + 10, "c": np.array([[20.0, 21.0]])}
    layout.pack(arrays, buffer)
    assert buffer[:13].tolist() == list(range(6)) + list(range(10, 15)) + [20, 21] and buffer[13:].tolist() == [0, 0]
    for name, view in layout.views(buffer).items():
        assert np.array_equal(view, arrays[name])


def test_a_process_started_without_a_launcher_is_alone():
    assert distributed.launched_size({}) == 1
    assert distributed.launched_size({"OMPI_COMM_WORLD_SIZE": "4"}) == 4
    assert distributed.launched_size({"PMI_SIZE": "3"}) == 3


class FakeNccl:
    """cupy.cuda.nccl's surface: records the calls NcclArrays makes."""
    NCCL_FLOAT32, NCCL_FLOAT64, NCCL_SUM = 7, 8, 0
    calls = []

    @staticmethod
    def get_unique_id():
        return ("unique", 42)

    class NcclCommunicator:
        def __init__(self, size, unique_id, rank):
            FakeNccl.calls.append(("init", size, unique_id, rank))

        def allReduce(self, send, receive, count, dtype, op, stream):
            FakeNccl.calls.append(("allReduce", send == receive, count, dtype, op))

        def allGather(self, send, receive, count, dtype, stream):
            FakeNccl.calls.append(("allGather", send - receive, count, dtype))


class FakeComm:
    """Rank 1 of 2: bcast returns what rank 0 sent (the NCCL id)."""

    def Get_rank(self):
        return 1

    def Get_size(self):
        return 2

    def bcast(self, value, root=0):
        assert value is None  # only rank 0 draws the id
        return FakeNccl.get_unique_id()


class FakeDeviceArray:
    """A CuPy array's surface: size, dtype, data.ptr, and slicing that moves the pointer."""

    def __init__(self, size, pointer=1000):
        self.size, self.dtype = size, np.dtype(np.float32)
        self.data = type("Memory", (), {"ptr": pointer})()

    def __getitem__(self, part):
        return FakeDeviceArray(part.stop - part.start, self.data.ptr + 4 * part.start)


def test_nccl_collectives_use_rank_0s_id_and_whole_buffers(monkeypatch):
    FakeNccl.calls.clear()
    monkeypatch.setattr(distributed.NcclArrays, "_stream", staticmethod(lambda: 0))
    arrays = distributed.NcclArrays(FakeComm(), FakeNccl)
    buffer = FakeDeviceArray(10)
    arrays.sum(buffer)
    arrays.all_gather(buffer, 5)
    assert FakeNccl.calls == [("init", 2, ("unique", 42), 1), ("allReduce", True, 10, FakeNccl.NCCL_FLOAT32, 0),
                              ("allGather", 4 * 5, 5, FakeNccl.NCCL_FLOAT32)]  # in place: rank 1's part at its place
