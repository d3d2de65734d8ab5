"""Logits, loss and every gradient against HF transformers' LlamaForCausalLM, in float32.

The fixtures are made by tests/fixtures/make_hf_fixtures.py (torch + transformers, run by hand);
this test needs neither."""
import glob
import json
import os

import numpy as np
import pytest

import npllama
from npllama import backend

FIXTURES = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "fixtures", "hf_*.npz")))
NAMES = [os.path.basename(path)[3:-4] for path in FIXTURES]


def test_fixtures_cover_the_required_configs():
    assert {"mha_untied", "gqa_tied", "rope_theta_eps", "odd_intermediate_mqa", "llama3_rope_scaling",
            "linear_rope_scaling"} <= set(NAMES)


@pytest.fixture(params=FIXTURES, ids=NAMES)
def fixture(request, xp):
    data = np.load(request.param)
    config = npllama.LlamaConfig.from_dict(json.loads(str(data["config_json"])))
    params = {key[len("param/"):]: xp.asarray(data[key]) for key in data.files if key.startswith("param/")}
    grads = {key[len("grad/"):]: data[key] for key in data.files if key.startswith("grad/")}
    return config, params, grads, data


def test_logits(fixture):
    config, params, _, data = fixture
    logits = backend.to_host(npllama.forward(params, config, data["input_ids"]))
    reference = data["logits"]
    assert logits.dtype == np.float32 and logits.shape == reference.shape
    assert np.abs(logits - reference).max() <= 1e-4 * np.abs(reference).max()


def test_loss_and_gradients(fixture):
    config, params, reference_grads, data = fixture
    loss, grads = npllama.loss_and_grads(params, config, data["input_ids"], data["targets"])
    assert abs(loss - float(data["loss"])) <= 1e-5
    assert sorted(grads) == sorted(reference_grads)
    for name, reference in reference_grads.items():
        grad = backend.to_host(grads[name])
        error = np.linalg.norm(grad - reference) / np.linalg.norm(reference)
        assert error <= 1e-4, f"{name}: relative L2 error {error:.2e}"
