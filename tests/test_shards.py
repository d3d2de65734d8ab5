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


@pytest.fixture
def tiny(xp):
    """config, params, a one-row shard (tokens, targets, dloss) and the main process's compute."""
    if xp is not np:
        pytest.skip("shard helper processes serve NumPy arrays only")
    config = npllama.LlamaConfig.preset("tiny")
    params = npllama.init_params(config)
    shard = (np.zeros((1, 4), dtype=np.int64), np.ones((1, 4), dtype=np.int64), 0.5)
    return config, params, shard, lambda s: model.shard_loss_and_grads(params, config, *s)


def test_shard_helper_errors_surface_and_the_next_step_works(tiny):
    config, params, good, compute = tiny
    bad = (np.full((1, 4), 10_000), good[1], 0.5)  # no such token: IndexError in the helper
    pool = shards.pool(1)
    helpers = list(pool.helpers)
    with pytest.raises(shards.HelperError, match="a shard helper process failed:(.|\n)*IndexError"):
        pool.run(params, config, [good, bad], compute)
    assert pool.closed and all(helper.poll() is not None for helper in helpers)
    with pytest.raises(shards.HelperError, match="0 helpers for 1 shards"):
        pool.run(params, config, [good, good], compute)
    losses, _ = shards.pool(1).run(params, config, [good, good], compute)
    assert abs(losses[0] - losses[1]) < 1e-6


def test_a_killed_helper_is_reported_and_replaced(tiny):
    config, params, shard, compute = tiny
    pool = shards.pool(1)
    pool.run(params, config, [shard, shard], compute)
    pool.helpers[0].kill()
    pool.helpers[0].wait()
    with pytest.raises(shards.HelperError, match=r"shard helper process \d+ ended \(signal 9\)"):
        pool.run(params, config, [shard, shard], compute)
    losses, _ = shards.pool(1).run(params, config, [shard, shard], compute)
    assert len(losses) == 2


def test_shared_memory_files_are_removed_once_mapped(tiny, monkeypatch):
    config, params, shard, compute = tiny
    created = []
    new_file = shards._new_file
    monkeypatch.setattr(shards, "_new_file", lambda size: created.append(new_file(size)) or created[-1])
    pool = shards.ShardPool(2)
    try:
        pool.run(params, config, [shard, shard, shard], compute)
    finally:
        pool.close()
    assert len(created) == 3 and not any(os.path.exists(path) for path in created)
