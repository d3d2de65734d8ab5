"""Training runs that survive: signals, kill -9 at any moment (inside saves too), crashes at each rename
of a save, damaged logs, a failed --force, two runs in one directory, settings that cannot train, and a
run too large for memory. Real `cli.py train` processes where the fault is a process's (a signal, a
kill), the library where a fault is injected."""
import errno
import os
import random
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from npllama import LlamaConfig, backend, init_params, model, train
from npllama.io import files
from tests.conftest import ROOT, array_bytes
from tests.test_train import (MODEL_SETTINGS, RUN_FLAGS, SHAPE_FLAGS, TEXT, TINY_FLAGS, assert_one_clear_line, cli,
                              library_run, logged_losses)


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "input.txt"
    path.write_text(TEXT)
    return path


# ---- signals: Ctrl-C and SIGTERM save, a second one stops at once (item 2) -----------------------
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_saves_and_resume_continues_exactly(tmp_path, text_file, stop):
    """A real interruption: SIGINT (Ctrl-C) or SIGTERM (docker stop, timeout) to a running `cli.py train`,
    then --resume, against a straight run."""
    command = [sys.executable, "cli.py", "train", "--data", str(text_file), "--max-iters", "300", *TINY_FLAGS]
    command[command.index("--eval-interval") + 1] = "100"
    straight = subprocess.run(command + ["--out", str(tmp_path / "straight")], cwd=ROOT, capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr

    process = subprocess.Popen(command + ["--out", str(tmp_path / "cut")], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    log = tmp_path / "cut" / train.LOG_FILE
    deadline = time.time() + 60
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 20):
        time.sleep(0.01)
    process.send_signal(stop)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + stop, stderr
    assert "interrupted at step" in stderr and "Traceback" not in stderr
    stopped = int(stderr.split("interrupted at step ")[1].split(":")[0])
    assert 0 < stopped < 300

    resumed = subprocess.run([sys.executable, "cli.py", "train", "--out", str(tmp_path / "cut"), "--resume"],
                             cwd=ROOT, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert logged_losses(tmp_path / "cut") == logged_losses(tmp_path / "straight")



def test_a_second_ctrl_c_stops_at_once_and_the_run_still_resumes_exactly(tmp_path, text_file):
    """Ctrl-C, then a second Ctrl-C while the checkpoint it asked for is being written (a real process,
    started from Python so that SIGINT is not ignored), three times: no traceback, and the run resumes
    and ends as the uninterrupted run."""
    command = [sys.executable, "cli.py", "train", "--data", str(text_file), "--max-iters", "100", *TINY_FLAGS]
    for flag, value in (("--eval-interval", "1"), ("--eval-iters", "1"), ("--sample-tokens", "0")):
        command[command.index(flag) + 1] = value
    straight = subprocess.run(command + ["--out", str(tmp_path / "straight")], cwd=ROOT, capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr
    out = tmp_path / "cut"
    resume = [sys.executable, "cli.py", "train", "--out", str(out), "--resume"]
    for attempt in range(3):
        rows = logged_rows(out)
        process = subprocess.Popen(resume if attempt else command + ["--out", str(out)], cwd=ROOT,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 60
        while process.poll() is None and logged_rows(out) < rows + 3 and time.time() < deadline:
            time.sleep(0.005)
        process.send_signal(signal.SIGINT)
        while process.poll() is None and not saving(out) and time.time() < deadline:
            pass
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
        assert "Traceback" not in stderr, stderr
        assert process.returncode in (1, 130), stderr  # stopped at once ("Aborted!"), or saved before the second
    final = subprocess.run(resume, cwd=ROOT, capture_output=True, text=True)
    assert final.returncode == 0, final.stderr
    assert logged_losses(out) == logged_losses(tmp_path / "straight")


# ---- a checkpoint is one unit: kills and crashes at any moment (items 1, 3) ----------------------
@pytest.mark.parametrize("crash_at, resumes_at", [(0, 3), (1, 3), (2, 5), (3, 5)])
def test_a_checkpoint_cut_short_anywhere_resumes_exactly(tmp_path, text_file, monkeypatch, crash_at, resumes_at):
    """A save killed at any of its renames (the optimizer's, then the model's file renamed to NAME.next
    as it is finished; then both renamed over the checkpoint) leaves a run that resumes exactly: from the
    checkpoint before until the model's .next exists, from the new one after."""
    straight = library_run(tmp_path / "straight", text_file)
    assert train.run(straight) == "done"
    cut = library_run(tmp_path / "cut", text_file)
    assert train.run(cut, should_stop=lambda: cut.step == 3) == "interrupted"  # a whole checkpoint at 3

    class Killed(BaseException):
        pass
    renames, real_replace = [], os.replace

    def replace(source, target):
        if os.path.basename(target) == train.LOG_FILE:
            return real_replace(source, target)
        if len(renames) == crash_at:
            raise Killed
        renames.append(target)
        real_replace(source, target)
    run = train.resume(str(tmp_path / "cut"), max_iters=9)
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(Killed):
        train.run(run, should_stop=lambda: run.step == 5)  # its save at step 5 is cut short
    monkeypatch.setattr(os, "replace", real_replace)
    resumed = train.resume(str(tmp_path / "cut"), max_iters=9)
    assert resumed.step == resumes_at
    assert train.run(resumed) == "done"
    assert logged_losses(tmp_path / "cut") == logged_losses(tmp_path / "straight")
    assert not [name for name in os.listdir(tmp_path / "cut") if name.endswith((".next", ".tmp"))]


def saving(directory):
    """Whether a checkpoint is being written in directory: a .next file or a temporary file exists."""
    return any(name.endswith((train.NEXT, files.TEMPORARY_SUFFIX)) for name in os.listdir(directory))


def logged_rows(directory):
    try:
        with open(os.path.join(directory, train.LOG_FILE)) as file:
            return sum(1 for _ in file)
    except FileNotFoundError:
        return 0


def test_kill_9_at_random_moments_never_loses_the_run(tmp_path, text_file):
    """`kill -9` a real `cli.py train` 20 times (a checkpoint every step), resuming after each: the run
    always resumes and ends as the uninterrupted run. Each kill waits for 1-3 more logged steps, then half
    the kills wait 0-60 ms and half until a save is under way, so kills land mid-run and inside saves on a
    fast or a slow machine."""
    command = [sys.executable, "cli.py", "train", "--data", str(text_file), "--max-iters", "100", *TINY_FLAGS]
    for flag, value in (("--eval-interval", "1"), ("--eval-iters", "1"), ("--sample-tokens", "0")):
        command[command.index(flag) + 1] = value
    straight = subprocess.run(command + ["--out", str(tmp_path / "straight")], cwd=ROOT, capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr
    out, rng = tmp_path / "killed", random.Random(0)
    resume = [sys.executable, "cli.py", "train", "--out", str(out), "--resume"]
    inside_a_save = 0
    for attempt in range(20):
        # a whole checkpoint: optimizer.safetensors, or the model's .next (written last, see TrainingRun.save)
        started = (out / train.OPTIMIZER_FILE).exists() or (out / (train.MODEL_FILE + train.NEXT)).exists()
        kill_after_rows = logged_rows(out) + rng.randint(1, 3)
        process = subprocess.Popen(resume if started else command + ["--out", str(out), "--force"], cwd=ROOT,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 60
        while process.poll() is None and logged_rows(out) < kill_after_rows and time.time() < deadline:
            time.sleep(0.005)
        if attempt % 2:
            time.sleep(rng.uniform(0, 0.06))
        else:
            while process.poll() is None and not saving(out) and time.time() < deadline:
                pass
        process.kill()
        _, stderr = process.communicate()
        assert "Traceback" not in stderr, stderr
        assert process.returncode == -signal.SIGKILL, stderr  # killed mid-run, not after the run ended
        inside_a_save += saving(out)
    assert inside_a_save >= 5, inside_a_save  # the premise: kills cut checkpoints short
    final = subprocess.run(resume, cwd=ROOT, capture_output=True, text=True)
    assert final.returncode == 0, final.stderr
    assert logged_losses(out) == logged_losses(tmp_path / "straight")


def test_resume_and_start_remove_what_a_killed_write_left(tmp_path, text_file):
    """A run killed while writing leaves .model.safetensors.XXXX.tmp and the like: gone on the next
    resume (or start over); files that are not such leftovers stay."""
    run = library_run(tmp_path / "r", text_file, max_iters=2)
    train.run(run)
    leftovers = [".model.safetensors.k3j9x1ab.tmp", ".optimizer.safetensors.0q8w2e7r.tmp", ".log.csv.zz9.tmp"]
    kept = ["notes.tmp", ".hidden", "model.safetensors.tmp"]
    for name in leftovers + kept:
        (tmp_path / "r" / name).write_bytes(b"partial")
    train.resume(str(tmp_path / "r"), max_iters=3)
    assert not any((tmp_path / "r" / name).exists() for name in leftovers)
    assert all((tmp_path / "r" / name).exists() for name in kept)
    (tmp_path / "r" / leftovers[0]).write_bytes(b"partial")
    with pytest.warns(train.RunWarning, match="held a run: its files are now in"):
        train.start(str(tmp_path / "r"), str(text_file), model_settings=MODEL_SETTINGS, force=True,
                    settings=train.TrainSettings(batch_size=4, max_iters=2))
    assert not (tmp_path / "r" / leftovers[0]).exists()


# ---- the log (item 6) ----------------------------------------------------------------------------
@pytest.mark.parametrize("damage, fragment", [
    (b"\xff\xfe not text\n", "is damaged ('utf-8' codec can't decode"),
    (b"step,loss\n1,3.2\n", "is damaged (its columns are not step,lr,"),
    (b"\n".join([",".join(train.LOG_FIELDS).encode(), b"one,2,3,4,5,6,7,8", b""]), "is damaged (line 2 is not a row"),
    (b"\n".join([",".join(train.LOG_FIELDS).encode(), b"1,2,3", b""]), "is damaged (line 2 is not a row"),
])
def test_a_damaged_log_is_one_line_on_resume_and_is_kept(tmp_path, text_file, damage, fragment):
    run = library_run(tmp_path / "run", text_file)
    assert train.run(run, should_stop=lambda: run.step == 3) == "interrupted"
    log = tmp_path / "run" / train.LOG_FILE
    log.write_bytes(damage)
    assert_one_clear_line(cli("train", "--out", tmp_path / "run", "--resume"), f"{log} {fragment}")
    assert log.read_bytes() == damage


def test_a_log_row_cut_short_is_dropped_on_resume(tmp_path, text_file):
    """A kill inside a log row's write leaves a last line without its newline: resuming drops it and the
    run ends as the uninterrupted one."""
    straight = library_run(tmp_path / "straight", text_file)
    assert train.run(straight) == "done"
    run = library_run(tmp_path / "cut", text_file)
    assert train.run(run, should_stop=lambda: run.step == 3) == "interrupted"
    with open(tmp_path / "cut" / train.LOG_FILE, "a") as log:
        log.write("4,0.0003,3.1")
    resumed = train.resume(str(tmp_path / "cut"))
    assert train.run(resumed) == "done"
    assert logged_losses(tmp_path / "cut") == logged_losses(tmp_path / "straight")



def test_a_full_disk_stops_the_run_saying_what_was_kept(tmp_path, text_file, monkeypatch):
    """No space for a checkpoint: one line naming the step and the checkpoint kept, which then resumes
    exactly; no space for a log row: one line naming log.csv."""
    straight = library_run(tmp_path / "straight", text_file)
    assert train.run(straight) == "done"
    run = library_run(tmp_path / "full", text_file)
    assert train.run(run, should_stop=lambda: run.step == 3) == "interrupted"  # the checkpoint of step 3

    def disk_full(path, *args, **kwargs):
        with files.replacing(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with monkeypatch.context() as patch:
        patch.setattr(train.weights, "save", disk_full)
        with pytest.raises(train.TrainError, match=re.escape(
                f"no space left on device saving the checkpoint of step 6 in {tmp_path / 'full'}; the checkpoint "
                "of step 3 is kept")):
            train.run(train.resume(str(tmp_path / "full")))
    assert not [name for name in os.listdir(tmp_path / "full") if name.endswith((train.NEXT, files.TEMPORARY_SUFFIX))]

    def appending_fails(path, mode="r", *args, **kwargs):
        if "a" in mode:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return open(path, mode, *args, **kwargs)
    with monkeypatch.context() as patch:
        patch.setattr(train, "open", appending_fails, raising=False)
        with pytest.raises(files.DiskFullError, match=re.escape(
                f"no space left on device writing {tmp_path / 'full' / train.LOG_FILE}; its last row may be cut "
                "short (a resume drops it)")):
            train.run(train.resume(str(tmp_path / "full")))
    resumed = train.resume(str(tmp_path / "full"))
    assert resumed.step == 3 and train.run(resumed) == "done"
    assert logged_losses(tmp_path / "full") == logged_losses(tmp_path / "straight")


# ---- --force and one run per directory (items 4, 5) ----------------------------------------------
def test_a_failed_force_never_damages_the_previous_run(tmp_path, text_file):
    """--force over a run moves the run aside (said in one line): a new run that diverges leaves it whole,
    and one that cannot start puts it back."""
    out = tmp_path / "r"
    assert cli("train", "--data", text_file, "--out", out, "--max-iters", 2, *TINY_FLAGS).exit_code == 0
    before = {name: (out / name).read_bytes() for name in train.RUN_FILES if (out / name).exists()}
    (tmp_path / "empty.txt").write_text("")
    failed_start = cli("train", "--data", tmp_path / "empty.txt", "--out", out, "--force", *TINY_FLAGS)
    assert failed_start.exit_code == 1 and "empty" in failed_start.stderr
    assert {name: (out / name).read_bytes() for name in before} == before and not (out / "previous-1").exists()
    diverged = cli("train", "--data", text_file, "--out", out, "--force", "--max-iters", 50, "--lr", 1e39,
                   "--grad-clip", 0, "--warmup", 0, *SHAPE_FLAGS, "--eval-interval", 1, "--eval-iters", 1)
    assert diverged.exit_code == 1 and "became nan" in diverged.stderr
    assert f"Warning: {out} held a run: its files are now in {out / 'previous-1'}" in diverged.stderr
    assert {name: (out / "previous-1" / name).read_bytes() for name in before} == before
    assert not (out / train.OPTIMIZER_FILE).exists()  # nothing of the failed run passes for a checkpoint


def test_one_run_per_directory_at_a_time(tmp_path, text_file):
    """A second `train` into a directory another live process trains in is refused in one line; the lock
    of a process that is gone (kill -9) is taken over."""
    out = tmp_path / "busy"
    command = [sys.executable, "cli.py", "train", "--data", str(text_file), "--max-iters", "100000", *TINY_FLAGS]
    first = subprocess.Popen(command + ["--out", str(out)], cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not (out / train.OPTIMIZER_FILE).exists():
            time.sleep(0.05)
        assert (out / train.LOCK_FILE).read_text() == str(first.pid)
        for second in (cli("train", "--out", out, "--resume"),
                       cli("train", "--data", text_file, "--out", out, "--force", *TINY_FLAGS)):
            assert_one_clear_line(second, f"{out} is in use by another training run (process {first.pid})")
    finally:
        first.kill()
        first.wait()
    assert (out / train.LOCK_FILE).exists()  # a killed process leaves its lock ...
    step = train.load_checkpoint(str(out)).state["step"]
    resumed = cli("train", "--out", out, "--resume", "--max-iters", step + 1)
    assert resumed.exit_code == 0, resumed.output  # ... which the next run takes over
    assert not (out / train.LOCK_FILE).exists()


# ---- settings that cannot train (item 6) ---------------------------------------------------------
@pytest.mark.parametrize("flags, message", [
    (["--lr", "inf"], "--lr must be a finite number, got inf"),
    (["--min-lr", "nan"], "--min-lr must be a finite number, got nan"),
    (["--min-lr", "inf"], "--min-lr must be a finite number, got inf"),
    (["--weight-decay", "nan"], "--weight-decay must be a finite number, got nan"),
    (["--grad-clip", "nan"], "--grad-clip must be a finite number, got nan"),
    (["--seed", "-1"], "--seed must not be negative, got -1"),
    (["--lr", "1e-4", "--min-lr", "1e-3"], "--min-lr 0.001 is above --lr 0.0001"),
])
def test_settings_that_cannot_train_are_one_line_and_leave_nothing(tmp_path, text_file, flags, message):
    assert_one_clear_line(cli("train", "--data", text_file, "--out", tmp_path / "r", *TINY_FLAGS, *flags), message)
    assert not (tmp_path / "r").exists()


def test_a_negative_seed_elsewhere_is_one_line(tmp_path):
    from npllama.generation import GenerationError, generate
    config = LlamaConfig.preset("tiny")
    with pytest.raises(GenerationError, match="the seed must not be negative, got -1"):
        generate(init_params(config), config, [1], 2, temperature=1.0, seed=-1)


# ---- memory: the need estimated before a run allocates it (item 6) -------------------------------
@pytest.mark.parametrize("kv_heads", [8, 2])  # MHA (q and k kept rotated together); GQA (q grouped apart)
def test_the_activation_estimate_matches_what_the_forward_keeps(kv_heads):
    """memory_needed's activations against the bytes of the arrays a micro-batch's forward really keeps
    for backward (block caches, the head's cache, and the logits beside the probabilities)."""
    from npllama.ops import lm_head
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=176, num_hidden_layers=3,
                         num_attention_heads=8, num_key_value_heads=kv_heads, max_position_embeddings=48)
    settings = train.TrainSettings(batch_size=3, workers=1)
    params = init_params(config)
    weights = model.Weights(params, config)
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (3, 48))
    h, caches = model.run_stack(weights, tokens, keep_caches=True)
    _, head_cache = lm_head.forward(h, weights.head, tokens)
    seen = {id(array) for array in params.values()}
    kept = array_bytes(caches.blocks, seen) + array_bytes(head_cache, seen) + tokens.size * config.vocab_size * 4
    estimate = train.memory_needed(config, settings)
    assert abs(estimate["activations"] - kept) < 0.02 * kept, (estimate["activations"], kept)
    assert estimate["weights"] == sum(array.nbytes for array in params.values())
    assert estimate["AdamW moments"] == 2 * estimate["weights"]


@pytest.mark.parametrize("grad_accum, recompute, layers", [(1, False, 2), (3, False, 2), (1, True, 6)])
def test_the_estimate_matches_the_peak_of_a_whole_step(grad_accum, recompute, layers):
    """What an optimizer step allocates at its peak (tracemalloc, which sees NumPy's arrays) beyond the
    weights and AdamW's moments, against memory_needed's gradients and activations: within 5% under, 15% over."""
    import tracemalloc
    from npllama import adamw
    config = LlamaConfig(vocab_size=500, hidden_size=256, intermediate_size=688, num_hidden_layers=layers,
                         num_attention_heads=8, max_position_embeddings=64)
    settings = train.TrainSettings(batch_size=2, grad_accum=grad_accum, workers=1, recompute=recompute)
    params, optimizer = model.trainable(init_params(config)), adamw.AdamW(1e-3)
    rng = np.random.default_rng(0)
    batches = [(rng.integers(0, 500, (2, 64)), rng.integers(0, 500, (2, 64))) for _ in range(grad_accum)]
    train.optimizer_step(params, config, optimizer, batches, 1e-3, 1.0, recompute=recompute)  # the moments exist now
    tracemalloc.start()
    try:
        train.optimizer_step(params, config, optimizer, batches, 1e-3, 1.0, recompute=recompute)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    estimate = train.memory_needed(config, settings)
    assert 0.95 < peak / (estimate["gradients"] + estimate["activations"]) < 1.15, (peak, estimate)


def test_a_run_too_large_for_memory_is_refused_before_it_allocates(tmp_path, text_file, monkeypatch):
    monkeypatch.setattr(backend, "free_memory", lambda: 50 << 20)
    result = cli("train", "--data", text_file, "--out", tmp_path / "big", "--max-iters", 1, *RUN_FLAGS,
                 "--preset", "stories110M")
    assert_one_clear_line(result, "this run needs about ")
    assert "50 MiB are free on the CPU; use a smaller --batch-size" in result.stderr
    assert not (tmp_path / "big").exists()
    small = cli("train", "--data", text_file, "--out", tmp_path / "small", "--max-iters", 1, *TINY_FLAGS)
    assert small.exit_code == 0, small.output


def test_recompute_trains_to_the_same_losses_bit_for_bit(tmp_path, text_file):
    """--recompute changes what is kept for backward, not what is computed: the same log, loss for loss."""
    def losses(directory):
        with open(os.path.join(directory, train.LOG_FILE)) as file:
            return [line.split(",")[:4] for line in file]
    for name, flags in (("stored", []), ("recompute", ["--recompute"])):
        result = cli("train", "--data", text_file, "--out", tmp_path / name, "--max-iters", 6, *TINY_FLAGS, *flags)
        assert result.exit_code == 0, result.output
    assert losses(tmp_path / "stored") == losses(tmp_path / "recompute")


def test_zero1_and_recompute_shrink_the_estimate():
    config = LlamaConfig.preset("stories15M")
    plain = train.memory_needed(config, train.TrainSettings(batch_size=8, context=256, workers=1))
    sharded = train.memory_needed(config, train.TrainSettings(batch_size=8, context=256, workers=1, world_size=4,
                                                              zero=1))
    recomputed = train.memory_needed(config, train.TrainSettings(batch_size=8, context=256, workers=1, recompute=True))
    assert sharded["AdamW moments"] == plain["AdamW moments"] // 4
    assert sharded["sums"] == pytest.approx(plain["weights"] * 2.25)  # flat parameters, gradients, a quarter
    # the per-layer activations go (L·a → L·D + a); the head's B·T·2V logits and probabilities stay
    assert recomputed["activations"] < 0.7 * plain["activations"] and recomputed["weights"] == plain["weights"]
