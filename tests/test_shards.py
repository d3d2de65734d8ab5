"""Batch shards computed in helper processes give the one-process result; their failures surface."""
import os

import numpy as np
import pytest

import npllama
from npllama import backend, model, shards
from tests.gradcheck import relative_error


def test_batch_shards_give_the_serial_result(xp, rng, monkeypatch):
    """Splitting the batch across CPU workers changes nothing but rounding, even with uneven shards
    and a shard whose targets are all ignored (it is skipped, and the mean stays over valid targets)."""
    config = npllama.LlamaConfig.preset("tiny")
    params = npllama.init_params(config, dtype="float64")
    tokens = rng.integers(0, config.vocab_size, (5, 6))
    targets = rng.integers(0, config.vocab_size, (5, 6))
    targets[:2] = -100  # with 3 workers the first shard is rows 0-1: nothing to predict
    targets[4, :3] = -100
    monkeypatch.setenv("NPLLAMA_WORKERS", "1")
    serial_loss, serial_grads = npllama.loss_and_grads(params, config, tokens, targets)
    monkeypatch.setenv("NPLLAMA_WORKERS", "3")
    if backend.cpu_workers() != 3:
        pytest.skip(f"batch shards run on the CPU with a controllable BLAS only ({backend.device()})")
    loss, grads = npllama.loss_and_grads(params, config, tokens, targets)
    assert abs(loss - serial_loss) < 1e-13
    for name, grad in grads.items():
        assert relative_error(grad, serial_grads[name]) < 1e-12, name


def test_shard_helper_errors_surface_and_the_next_step_works(xp):
    if xp is not np:
        pytest.skip("shard helper processes serve NumPy arrays only")
    config = npllama.LlamaConfig.preset("tiny")
    params = npllama.init_params(config)
    good = (np.zeros((1, 4), dtype=np.int64), np.ones((1, 4), dtype=np.int64), 0.5)
    bad = (np.full((1, 4), 10_000), np.ones((1, 4), dtype=np.int64), 0.5)  # no such token: IndexError

    def compute(shard):
        return model.shard_loss_and_grads(params, config, *shard)

    pool = shards.pool(1)
    helpers = list(pool.helpers)
    with pytest.raises(RuntimeError, match="a shard helper process failed: IndexError"):
        pool.run(params, config, [good, bad], compute)
    assert pool.closed and all(helper.poll() is not None for helper in helpers)
    losses, _ = shards.pool(1).run(params, config, [good, good], compute)
    assert abs(losses[0] - losses[1]) < 1e-6


def test_shared_memory_files_are_removed_once_mapped(xp):
    if xp is not np:
        pytest.skip("shard helper processes serve NumPy arrays only")
    config = npllama.LlamaConfig.preset("tiny")
    params = npllama.init_params(config)
    shard = (np.zeros((1, 4), dtype=np.int64), np.ones((1, 4), dtype=np.int64), 0.5)
    before = set(os.listdir(shards.SHARED_DIRECTORY))
    shards.pool(1).run(params, config, [shard, shard], lambda s: model.shard_loss_and_grads(params, config, *s))
    assert set(os.listdir(shards.SHARED_DIRECTORY)) == before
