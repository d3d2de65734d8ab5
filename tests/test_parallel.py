"""The gradient reduction seam (runtime/parallel.py): a batch cut into shards gives the one-process
result, the shard pool's helper processes give exactly what one process gives for the same shards
(LM training, LoRA, classification), and their failures surface."""
import os

import numpy as np
import pytest

import npllama
from npllama import adapters, backend, classify, train
from npllama.runtime import parallel
from tests.gradcheck import relative_error


def pool_or_skip(count):
    workers = parallel.workers(count)
    if not isinstance(workers, parallel.Workers):
        pytest.skip(f"the shard pool runs on the CPU with a controllable BLAS only ({backend.device()})")
    return workers


def assert_same(result, expected):
    (loss, grads), (expected_loss, expected_grads) = result, expected
    assert loss == expected_loss and sorted(grads) == sorted(expected_grads)
    for name, grad in grads.items():
        assert np.array_equal(backend.to_host(grad), backend.to_host(expected_grads[name])), name


@pytest.fixture
def batch(rng):
    config = npllama.LlamaConfig.preset("tiny")
    tokens = rng.integers(0, config.vocab_size, (5, 6))
    targets = rng.integers(0, config.vocab_size, (5, 6))
    targets[:2] = -100  # with 3 shards the first is rows 0-1: nothing to predict
    targets[4, :3] = -100
    return config, tokens, targets


def test_batch_shards_give_the_serial_result(xp, batch):
    """Splitting the batch into shards changes nothing but rounding, even with uneven shards and a shard
    whose targets are all ignored (it is left out, and the mean stays over valid targets)."""
    config, tokens, targets = batch
    params = npllama.init_params(config, dtype="float64")
    serial_loss, serial_grads = npllama.loss_and_grads(params, config, tokens, targets)
    loss, grads = train.sharded_loss_and_grads(params, config, tokens, targets, shards=3,
                                               workers=parallel.OneProcess())
    assert abs(loss - serial_loss) < 1e-13
    for name, grad in grads.items():
        assert relative_error(grad, serial_grads[name]) < 1e-12, name


def test_the_pool_sums_what_one_process_sums(batch):
    """What a step computes depends on the shard count alone: helper processes or not, the same bits."""
    config, tokens, targets = batch
    params = npllama.init_params(config)
    pool = pool_or_skip(3)
    one = train.sharded_loss_and_grads(params, config, tokens, targets, 3, parallel.OneProcess())
    assert_same(train.sharded_loss_and_grads(params, config, tokens, targets, 3, pool), one)


def test_lora_shards_in_the_pool(batch, rng):
    config, tokens, targets = batch
    params = npllama.init_params(config)
    lora = adapters.init_adapters(params, config, ("q_proj", "down_proj"), 2, 4.0, seed=0)
    lora = {name: rng.standard_normal(value.shape).astype(np.float32) for name, value in lora.items()}
    arrays = {**params, **lora}
    pool = pool_or_skip(2)
    one = train.sharded_loss_and_grads(arrays, config, tokens, targets, 2, parallel.OneProcess(), lora_scale=2.0)
    assert sorted(one[1]) == sorted(lora)  # the frozen base gets no gradient
    assert_same(train.sharded_loss_and_grads(arrays, config, tokens, targets, 2, pool, lora_scale=2.0), one)
    # a frozen array is copied to the helpers once a run; another run sees what it holds now
    arrays["model.layers.0.mlp.up_proj.weight"] *= 1.5
    changed = train.sharded_loss_and_grads(arrays, config, tokens, targets, 2, parallel.OneProcess(), lora_scale=2.0)
    assert changed[0] != one[0]
    assert_same(train.sharded_loss_and_grads(arrays, config, tokens, targets, 2, parallel.workers(2),
                                             lora_scale=2.0), changed)


def test_classification_shards_in_the_pool(rng):
    config = npllama.LlamaConfig.preset("tiny")
    arrays = {**npllama.init_params(config), "head.weight": rng.standard_normal((3, 32)).astype(np.float32),
              "head.bias": np.zeros(3, np.float32)}
    batch = [(0, [1, 4, 2, 7]), (2, [3, 3]), (1, [5, 6, 7, 8, 9, 2])]
    tasks = [(config, None, batch[:2], 2 / 3), (config, None, batch[2:], 1 / 3)]
    pool = pool_or_skip(2)
    one = parallel.OneProcess().run(classify.shard_loss_and_grads, arrays, tasks)
    assert sorted(one[1]) == sorted(set(arrays) - {"lm_head.weight"})  # the model but its LM head, and the head
    assert_same(pool.run(classify.shard_loss_and_grads, arrays, tasks), one)
    whole = classify.batch_loss_and_grads(arrays, config, {"weight": arrays["head.weight"],
                                                            "bias": arrays["head.bias"]}, batch)
    for name, grad in one[1].items():
        assert relative_error(grad, whole[1][name]) < 1e-5, name


@pytest.fixture
def tiny(xp):
    """arrays, a one-row shard's task arguments, for the pool's failure tests."""
    if xp is not np:
        pytest.skip("shard helper processes serve NumPy arrays only")
    config = npllama.LlamaConfig.preset("tiny")
    shard = (config, None, np.zeros((1, 4), dtype=np.int64), np.ones((1, 4), dtype=np.int64), 0.5)
    return npllama.init_params(config), shard


def test_shard_helper_errors_surface_and_the_next_step_works(tiny):
    arrays, good = tiny
    bad = good[:2] + (np.full((1, 4), 10_000),) + good[3:]  # no such token: the helper's step fails
    pool = parallel.pool(1)
    helpers = list(pool.helpers)
    with pytest.raises(parallel.HelperError, match="a shard helper process failed:(.|\n)*token ids must lie"):
        pool.run(train.shard_loss_and_grads, arrays, [good, bad])
    assert pool.closed and all(helper.poll() is not None for helper in helpers)
    with pytest.raises(parallel.HelperError, match="0 helpers for 1 shards"):
        pool.run(train.shard_loss_and_grads, arrays, [good, good])
    losses, _ = parallel.pool(1).run(train.shard_loss_and_grads, arrays, [good, good])
    assert abs(losses[0] - losses[1]) < 1e-6


def test_a_killed_helper_is_reported_and_replaced(tiny):
    arrays, shard = tiny
    pool = parallel.pool(1)
    pool.run(train.shard_loss_and_grads, arrays, [shard, shard])
    pool.helpers[0].kill()
    pool.helpers[0].wait()
    with pytest.raises(parallel.HelperError, match=r"shard helper process \d+ ended \(signal 9\)"):
        pool.run(train.shard_loss_and_grads, arrays, [shard, shard])
    losses, _ = parallel.pool(1).run(train.shard_loss_and_grads, arrays, [shard, shard])
    assert len(losses) == 2


def test_shared_memory_files_are_removed_once_mapped(tiny, monkeypatch):
    arrays, shard = tiny
    created = []
    new_file = parallel._new_file
    monkeypatch.setattr(parallel, "_new_file", lambda size: created.append(new_file(size)) or created[-1])
    pool = parallel.ShardPool(2)
    try:
        pool.run(train.shard_loss_and_grads, arrays, [shard, shard, shard])
    finally:
        pool.close()
    assert len(created) == 3 and not any(os.path.exists(path) for path in created)
