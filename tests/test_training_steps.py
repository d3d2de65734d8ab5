"""Whole training steps against torch (llm.c's test_gpt2 in spirit): forward, backward, gradient
clipping and AdamW, four steps of a random tied GQA model at changing learning rates, written by
tests/fixtures/make_hf_fixtures.py with torch and HF transformers (the test needs neither). npllama's
own step (train.optimizer_step) must reach the same losses, gradient norms and final parameters.

The tolerances are float32's: losses and norms agree to ~1e-6 here. AdamW divides each moment by the
root of its square, so an element whose gradient is near zero takes a step of ~lr whatever its last
bits: rounding differences there grow into the update itself. The updates (final − initial) agree to
a relative L2 error of 4e-5 (one shard) and 1.6e-4 (two shards, summed in another order); the bounds
below are 1e-3 of the update and 2e-4 of the largest weight. A step that skipped the clipping misses
by 1.8e-2, one without the weight decay by 3.5e-2, one without the bias correction by 0.4."""
import json
import os

import numpy as np
import pytest

import npllama
from npllama import backend, train
from npllama.runtime import parallel

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "training_steps.npz")


@pytest.mark.parametrize("shards", [1, 2], ids=["one shard", "two shards"])
def test_training_steps_match_torch(xp, shards):
    data = np.load(FIXTURE)
    config = npllama.LlamaConfig.from_dict(json.loads(str(data["config_json"])))
    params = {key[len("param/"):]: xp.asarray(data[key]) for key in data.files if key.startswith("param/")}
    optimizer = npllama.AdamW(betas=tuple(data["betas"]), eps=float(data["eps"]),
                              weight_decay=float(data["weight_decay"]))
    for step, lr in enumerate(data["lr"]):
        loss, norm = train.optimizer_step(params, config, optimizer, [(data["tokens"][step], data["targets"][step])],
                                          float(lr), float(data["max_norm"]), shards, parallel.OneProcess())
        assert abs(loss - data["loss"][step]) <= 1e-5, step
        assert abs(norm - data["grad_norm"][step]) <= 1e-5 * data["grad_norm"][step], step
    for name, value in params.items():
        final, start, value = data[f"final/{name}"], data[f"param/{name}"], backend.to_host(value)
        assert np.abs(final - start).max() > 1e-3, name  # every tensor was trained
        assert np.linalg.norm((value - start) - (final - start)) <= 1e-3 * np.linalg.norm(final - start), name
        assert np.abs(value - final).max() <= 2e-4 * np.abs(final).max(), name
