"""LoRA: the adapter's backward against finite differences (float64), frozen weights getting no
gradient, the whole model with adapters, and merged adapters computing what unmerged ones do."""
import os

import numpy as np
import pytest

import npllama
from npllama import adapters as lora, backend
from npllama.ops import linear
from tests.gradcheck import numerical_grad, relative_error
from tests.test_model_gradcheck import random_params

CONFIG = npllama.LlamaConfig(vocab_size=13, hidden_size=16, intermediate_size=20, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2)


def random_adapters(params, targets, xp, rng, rank=3):
    """Adapters with B not zero (a trained one), so every path through them is exercised."""
    adapters = lora.init_adapters(params, CONFIG, targets, rank, alpha=6.0, seed=1)
    return {name: xp.asarray(rng.standard_normal(value.shape) * 0.5) for name, value in adapters.items()}


def test_adapted_linear_gradients(xp, rng):
    x = xp.asarray(rng.standard_normal((2, 5, 7)))
    weight = lora.Adapted(xp.asarray(rng.standard_normal((6, 7))), xp.asarray(rng.standard_normal((3, 7))),
                          xp.asarray(rng.standard_normal((6, 3))), 1.7)
    dy = xp.asarray(rng.standard_normal((2, 5, 6)))

    def objective():
        return float((linear.forward(x, weight)[0] * dy).sum())
    y, cache = linear.forward(x, weight)
    dx, grad = linear.backward(dy, cache)
    assert sorted(grad) == [lora.A_NAME, lora.B_NAME]
    for analytic, value in ((dx, x), (grad[lora.A_NAME], weight.a), (grad[lora.B_NAME], weight.b)):
        assert relative_error(analytic, numerical_grad(objective, value)) < 1e-6
    expected = x @ weight.values.T + 1.7 * (x @ weight.a.T) @ weight.b.T
    assert float(xp.abs(y - expected).max()) < 1e-12


def test_frozen_weight_passes_dx_and_has_no_gradient(xp, rng):
    x, w = xp.asarray(rng.standard_normal((4, 7))), xp.asarray(rng.standard_normal((6, 7)))
    dy = xp.asarray(rng.standard_normal((4, 6)))
    dx, grad = linear.backward(dy, linear.forward(x, lora.Frozen(w))[1])
    assert grad is None and float(xp.abs(dx - dy @ w).max()) < 1e-12


@pytest.mark.parametrize("targets,tied", [(("q_proj", "v_proj"), False), (lora.TARGETS, False), (lora.TARGETS, True)],
                         ids=["q,v", "all", "all, tied"])
def test_model_gradients_reach_only_the_adapters(xp, rng, targets, tied):
    config = npllama.LlamaConfig(**{**CONFIG.to_dict(), "tie_word_embeddings": tied})
    params = random_params(config, xp, rng)
    adapters = random_adapters(params, targets, xp, rng)
    attached = lora.attach(params, adapters, scale=2.0)
    tokens, targets_ids = rng.integers(0, 13, (2, 2, 5))
    loss, grads = npllama.loss_and_grads(attached, config, tokens, targets_ids)
    assert sorted(grads) == sorted(adapters)  # no gradient for any base weight

    def loss_only():
        return npllama.loss_and_grads(attached, config, tokens, targets_ids)[0]
    for name, value in adapters.items():
        indices = rng.choice(value.size, size=4, replace=False)
        numeric = numerical_grad(loss_only, value, indices)
        assert np.abs(numeric).max() > 1e-4, name
        assert relative_error(backend.to_host(grads[name]).reshape(-1)[indices], numeric) < 1e-6, name


def test_new_adapters_change_nothing_until_trained(xp, rng):
    params = random_params(CONFIG, xp, rng)
    adapters = lora.init_adapters(params, CONFIG, ("q_proj", "v_proj"), rank=4, alpha=8, seed=0)
    tokens = rng.integers(0, 13, (2, 6))
    plain = npllama.forward(params, CONFIG, tokens)
    assert float(xp.abs(npllama.forward(lora.attach(params, adapters, 2.0), CONFIG, tokens) - plain).max()) == 0
    assert all(float(xp.abs(b).max()) == 0 for name, b in adapters.items() if "lora_B" in name)
    assert all(float(xp.abs(a).max()) > 0 for name, a in adapters.items() if "lora_A" in name)


def test_merged_and_unmerged_adapters_give_the_same_logits(rng):
    params = npllama.init_params(CONFIG, seed=0)
    adapters = {name: value.astype(np.float32) for name, value in
                random_adapters(params, lora.TARGETS, np, rng).items()}
    tokens = rng.integers(0, 13, (2, 9))
    unmerged = npllama.forward(lora.attach(params, adapters, 0.5), CONFIG, tokens)
    merged = npllama.forward(lora.merge(params, adapters, 0.5), CONFIG, tokens)
    assert np.abs(merged - unmerged).max() <= 1e-5 * np.abs(unmerged).max()
    assert np.abs(merged - npllama.forward(params, CONFIG, tokens)).max() > 1e-2  # the adapters matter


def test_generation_applies_unmerged_adapters(rng):
    params = npllama.init_params(CONFIG, seed=0)
    params = {name: value * 10 if value.ndim == 2 else value for name, value in params.items()}
    adapters = {name: value.astype(np.float32) for name, value in
                random_adapters(params, lora.TARGETS, np, rng).items()}
    unmerged = npllama.generate(lora.attach(params, adapters, 0.5), CONFIG, [1, 2, 3], 12)
    assert unmerged == npllama.generate(lora.merge(params, adapters, 0.5), CONFIG, [1, 2, 3], 12)
    assert unmerged != npllama.generate(params, CONFIG, [1, 2, 3], 12)


def test_unknown_targets_are_refused():
    with pytest.raises(ValueError, match="LoRA targets must be among"):
        lora.init_adapters(npllama.init_params(CONFIG), CONFIG, ("q_proj", "wq"), 2, 4, 0)


# ---- training adapters, merging, generating through the CLI -------------------------------------------
def test_lora_train_merge_and_generate(tmp_path):
    from click.testing import CliRunner

    from npllama.cli import main
    from npllama import train
    from npllama.io import weights
    from tests.test_train import RUN_FLAGS, TEXT, TINY_FLAGS

    def cli(*args):
        result = CliRunner().invoke(main, [str(a) for a in args])
        assert result.exit_code == 0, result.output
        return result
    (tmp_path / "input.txt").write_text(TEXT)
    data = ["--data", tmp_path / "input.txt"]
    cli("train", *data, "--out", tmp_path / "base", "--max-iters", 6, *TINY_FLAGS)
    base = tmp_path / "base" / train.MODEL_FILE
    lora_flags = ["--init", base, "--lora-rank", 2, "--lora-alpha", 4, "--lora-targets", "q,v,down",
                  "--lr", 0.01, *RUN_FLAGS]
    trained = cli("train", *data, "--out", tmp_path / "straight", "--max-iters", 10, *lora_flags)
    assert "LoRA rank 2 (alpha 4) on q_proj, v_proj, down_proj" in trained.stdout
    adapters_file = tmp_path / "straight" / train.ADAPTERS_FILE
    assert f"generate --weights {base} --lora {adapters_file} --prompt" in trained.stdout  # a command that works
    tokens_file = next(n for n in os.listdir(tmp_path / "straight") if n.startswith("tokens-"))
    assert sorted(os.listdir(tmp_path / "straight")) == sorted(["adapters.safetensors", "log.csv", train.CURVES_FILE,
                                                                "optimizer.safetensors", tokens_file])
    adapters, info = weights.load_adapters(str(tmp_path / "straight" / train.ADAPTERS_FILE))
    assert info == {"rank": 2, "alpha": 4.0, "targets": ["q_proj", "v_proj", "down_proj"]}
    assert len(adapters) == 2 * 3  # one layer, three targets, A and B
    assert any(float(np.abs(value).max()) > 0 for name, value in adapters.items() if "lora_B" in name)  # trained


    merged = tmp_path / "merged.safetensors"
    cli("merge-lora", base, tmp_path / "straight" / train.ADAPTERS_FILE, "--out", merged)
    with_lora = cli("generate", "--weights", base, "--lora", tmp_path / "straight" / train.ADAPTERS_FILE,
                    "--prompt", "First", "-n", 10, "--temperature", 0)
    assert cli("generate", "--weights", merged, "--prompt", "First", "-n", 10, "--temperature", 0).stdout == \
        with_lora.stdout
    assert cli("generate", "--weights", base, "--prompt", "First", "-n", 10, "--temperature", 0).stdout != \
        with_lora.stdout

    cli("train", *data, "--out", tmp_path / "other", "--max-iters", 1, *TINY_FLAGS, "--seed", 7)
    on_another = CliRunner().invoke(main, ["generate", "--weights", str(tmp_path / "other"), "--lora",
                                           str(tmp_path / "straight" / train.ADAPTERS_FILE), "--prompt", "First"])
    assert on_another.exit_code == 1 and on_another.stderr.count("\n") == 1, on_another.output
    assert on_another.stderr.startswith(f"Error: {tmp_path / 'straight' / train.ADAPTERS_FILE} were trained on a "
                                        f"different model ({base}): ")


def test_an_interrupted_adapter_run_resumes_exactly(tmp_path):
    from npllama import train
    from tests.test_train import TEXT, logged_losses, tiny_run

    base = tiny_run(tmp_path / "base", max_iters=3)
    train.run(base)
    settings = dict(lora_rank=2, lora_alpha=3.0, lora_targets=("q_proj", "o_proj", "up_proj"),
                    init=str(base.checkpoint_file), max_iters=10, lr=1e-2)

    def adapter_run(directory):
        config, params, tokenizer = npllama.load(base.checkpoint_file)
        run_settings = train.TrainSettings(**{**vars(base.settings), "decay_iters": None, **settings})
        params = npllama.model.trainable(params)
        adapters = lora.init_adapters(params, config, settings["lora_targets"], 2, 3.0, run_settings.seed)
        return train.TrainingRun(str(directory), config, adapters, tokenizer, run_settings,
                                 np.array(tokenizer.encode(TEXT), np.uint16), base.data_info, base_params=params)
    straight = adapter_run(tmp_path / "straight")
    train.run(straight)
    first = adapter_run(tmp_path / "cut")
    train.run(first, should_stop=lambda: first.step == 6)
    saved = train.load_checkpoint(str(tmp_path / "cut"))
    resumed = train.TrainingRun(str(tmp_path / "cut"), saved.config, saved.params, saved.tokenizer,
                                train.TrainSettings(**saved.state["settings"]),
                                np.array(saved.tokenizer.encode(TEXT), np.uint16), saved.state["data"],
                                saved.optimizer, saved.state["step"], saved.state["rng_state"],
                                base_params=saved.base_params)
    train.run(resumed)
    assert logged_losses(tmp_path / "cut") == logged_losses(tmp_path / "straight")
    for name in straight.params:
        assert np.array_equal(resumed.params[name], straight.params[name]), name

    # what training computed with is what the saved adapters merge into (the same alpha / rank)
    from npllama.io import weights
    adapters, info = weights.load_adapters(str(tmp_path / "cut" / train.ADAPTERS_FILE), resumed.config)
    tokens = np.array([resumed.tokenizer.encode(TEXT[:16])])
    trained_logits = npllama.forward(resumed.model_params, resumed.config, tokens)
    merged = weights.merge_adapters(saved.base_params, adapters, info["alpha"] / info["rank"])
    merged_logits = npllama.forward({name: merged[name] for name in merged}, resumed.config, tokens)
    assert np.abs(trained_logits - merged_logits).max() <= 1e-5 * np.abs(trained_logits).max()
    assert info["alpha"] == 3.0

    os.utime(base.checkpoint_file, ns=(1, 1))  # the base model replaced: resuming would not be exact
    with pytest.raises(train.TrainError, match="missing or changed since the run started"):
        train.load_checkpoint(str(tmp_path / "cut"))


def test_lora_bad_inputs(tmp_path):
    from click.testing import CliRunner

    from npllama.cli import main
    from npllama import train
    from npllama.io import weights
    from tests.test_train import TEXT, TINY_FLAGS, assert_one_clear_line

    def cli(*args):
        return CliRunner().invoke(main, [str(a) for a in args])
    (tmp_path / "input.txt").write_text(TEXT)
    assert_one_clear_line(cli("train", "--data", tmp_path / "input.txt", "--out", tmp_path / "r", "--lora-rank", 2,
                              *TINY_FLAGS), "give its weights with --init")
    bad_targets = cli("train", "--data", tmp_path / "input.txt", "--lora-targets", "q,wq")
    assert bad_targets.exit_code == 2 and "choose among q, k, v, o, gate, up, down" in bad_targets.stderr

    small = npllama.init_params(CONFIG)
    weights.save(tmp_path / "small.safetensors", CONFIG, small)
    other = npllama.LlamaConfig(**{**CONFIG.to_dict(), "hidden_size": 8, "intermediate_size": 12})
    adapters = lora.init_adapters(npllama.init_params(other), other, ("q_proj",), 2, 2, 0)
    weights.save_adapters(tmp_path / "other.safetensors", adapters, 2, 2.0, ("q_proj",))
    assert_one_clear_line(cli("merge-lora", tmp_path / "small.safetensors", tmp_path / "other.safetensors",
                              "--out", tmp_path / "m.safetensors"), "this model needs (2, 16)")
    assert_one_clear_line(cli("generate", "--weights", tmp_path / "small.safetensors", "--lora",
                              tmp_path / "small.safetensors", "--prompt-ids", "1"), "not an npllama LoRA adapters file")
    assert not (tmp_path / "m.safetensors").exists() and train.ADAPTERS_FILE not in os.listdir(tmp_path)
    assert_one_clear_line(cli("train", "--data", tmp_path / "input.txt", "--out", tmp_path / "r", "--lora-alpha", 8,
                              *TINY_FLAGS), "give --lora-rank too")

    good = lora.init_adapters(small, CONFIG, ("q_proj",), 2, 2, 0)
    only_a = {name: value for name, value in good.items() if "lora_A" in name}
    on_norm = {"model.norm.lora_A.weight": np.zeros((2, 16), np.float32),
               "model.norm.lora_B.weight": np.zeros((16, 2), np.float32)}
    for adapters, rank, fragment in ((only_a, 2, "comes without its B"),
                                     (on_norm, 2, "is not the A or B of a LoRA adapter"), (good, 0, "must be positive")):
        weights.save_adapters(tmp_path / "bad.safetensors", adapters, rank, 2.0, ("q_proj",))
        assert_one_clear_line(cli("merge-lora", tmp_path / "small.safetensors", tmp_path / "bad.safetensors",
                                  "--out", tmp_path / "m.safetensors"), fragment)


# ---- adapters know the model they were trained on -------------------------------------------------------
BASE_CONFIG = npllama.LlamaConfig(vocab_size=40, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2)  # rows of 64: Q8_0's blocks fit
TARGETS = ("q_proj", "v_proj", "down_proj")
NOT_THEIR_BASE = (r"(?P<path>\S+) were trained on a different model \(base A\): (?P<weight>\w+ of layer \d) differs by "
                  r"(?P<percent>\d+)%; pass the model they were trained on")


@pytest.fixture
def trained_on_a(tmp_path, rng):
    """(base A's file, adapters trained on A: their file, their arrays), A a random model."""
    from npllama.io import weights
    base = npllama.init_params(BASE_CONFIG, seed=0)
    weights.save(tmp_path / "a.safetensors", BASE_CONFIG, base)
    trained = {name: (rng.standard_normal(value.shape) * 0.1).astype(np.float32)
               for name, value in lora.init_adapters(base, BASE_CONFIG, TARGETS, 4, 8.0, 0).items()}
    weights.save_adapters(tmp_path / "adapters.safetensors", trained, 4, 8.0, TARGETS, base_params=base,
                          base_name="base A")
    return tmp_path / "a.safetensors", tmp_path / "adapters.safetensors", trained


def copy_of(path, precision, tmp_path):
    """The model at path saved again: in fp16 or bf16 (npllama's file), or as a Q8_0 GGUF file."""
    from npllama.io import gguf_file, weights
    copy = tmp_path / f"copy-{precision}"
    if precision == "q8_0":
        weights.export_gguf(copy, *weights.load(str(path)), quant_type="q8_0")
        assert gguf_file.read_file(str(copy))[1]["blk.0.attn_q.weight"].type.name == "Q8_0"
    else:
        weights.save(copy, *weights.load(str(path)), dtype=precision)
    return copy


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16", "q8_0"])
def test_adapters_load_on_their_base_in_any_precision(tmp_path, trained_on_a, precision):
    import warnings

    from npllama.io import weights
    base_file, adapters_file, trained = trained_on_a
    config, params, _ = weights.load(str(copy_of(base_file, precision, tmp_path)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no notice: the base was checked
        loaded, info = weights.load_adapters(str(adapters_file), config, base_params=params)
    assert info == {"rank": 4, "alpha": 8.0, "targets": list(TARGETS)}
    assert sorted(loaded) == sorted(trained)
    assert all(np.array_equal(loaded[name], trained[name]) for name in trained)


def test_adapters_are_refused_on_another_model_of_their_shape(trained_on_a):
    import re

    from npllama.io import weights
    _, adapters_file, _ = trained_on_a
    other = npllama.init_params(BASE_CONFIG, seed=1)
    with pytest.raises(weights.WrongBaseError) as caught:
        weights.load_adapters(str(adapters_file), BASE_CONFIG, base_params=other)
    match = re.fullmatch(NOT_THEIR_BASE, str(caught.value))
    assert match and match["path"] == str(adapters_file) and match["weight"] == "q_proj of layer 0", str(caught.value)
    assert int(match["percent"]) > 50  # two independent weights of one scale differ by about √2


def test_the_refusal_names_the_first_weight_that_differs(trained_on_a):
    from npllama.io import weights
    base_file, adapters_file, _ = trained_on_a
    config, params, _ = weights.load(str(base_file))
    changed = {name: np.asarray(params[name]) for name in params}
    name = "model.layers.1.mlp.down_proj.weight"
    changed[name] = np.asarray(npllama.init_params(BASE_CONFIG, seed=1)[name])  # one weight of another model
    with pytest.raises(weights.WrongBaseError, match="down_proj of layer 1 differs by"):
        weights.load_adapters(str(adapters_file), config, base_params=changed)


def test_adapters_without_a_record_of_their_base_are_taken_with_a_notice(tmp_path, trained_on_a):
    from npllama.errors import Notice
    from npllama.io import weights
    base_file, _, trained = trained_on_a
    weights.save_adapters(tmp_path / "old.safetensors", trained, 4, 8.0, TARGETS)  # as older npllama wrote them
    other = npllama.init_params(BASE_CONFIG, seed=1)
    with pytest.warns(Notice, match="old.safetensors records no fingerprint of the model its adapters were trained on"):
        loaded, _ = weights.load_adapters(str(tmp_path / "old.safetensors"), BASE_CONFIG, base_params=other)
    assert sorted(loaded) == sorted(trained)


def test_a_damaged_record_of_the_base_is_one_line(tmp_path, trained_on_a):
    from npllama.io import safetensors_file, weights
    _, adapters_file, trained = trained_on_a
    metadata, tensors = safetensors_file.read(str(adapters_file))
    safetensors_file.write(tmp_path / "damaged.safetensors", dict(tensors), {**metadata, weights.BASE_KEY: '{"samples": 3}'})
    with pytest.raises(weights.WeightsError, match=r"damaged.safetensors: its record of the model it was trained on "
                                                   r"\(npllama.lora_base\) is damaged$"):
        weights.load_adapters(str(tmp_path / "damaged.safetensors"), BASE_CONFIG,
                              base_params=npllama.init_params(BASE_CONFIG, seed=0))


def test_adapters_saved_from_device_arrays_check_host_copies(xp, tmp_path, trained_on_a):
    from npllama.io import weights
    base_file, _, trained = trained_on_a
    config, params, _ = weights.load(str(base_file))
    on_device = {name: xp.asarray(np.asarray(params[name])) for name in params}
    weights.save_adapters(tmp_path / "device.safetensors", {n: xp.asarray(v) for n, v in trained.items()}, 4, 8.0,
                          TARGETS, base_params=on_device, base_name="base A")
    weights.load_adapters(str(tmp_path / "device.safetensors"), config, base_params=params)
    with pytest.raises(weights.WrongBaseError):
        weights.load_adapters(str(tmp_path / "device.safetensors"), config,
                              base_params=npllama.init_params(BASE_CONFIG, seed=1))


def test_merge_lora_refuses_another_model_and_takes_a_copy_of_theirs(tmp_path, trained_on_a):
    from click.testing import CliRunner

    from npllama.cli import main
    from npllama.io import weights
    from tests.test_train import assert_one_clear_line

    def cli(*args):
        return CliRunner().invoke(main, [str(a) for a in args])
    base_file, adapters_file, _ = trained_on_a
    weights.save(tmp_path / "b.safetensors", BASE_CONFIG, npllama.init_params(BASE_CONFIG, seed=1))
    refused = cli("merge-lora", tmp_path / "b.safetensors", adapters_file, "--out", tmp_path / "m.safetensors")
    assert_one_clear_line(refused, f"Error: {adapters_file} were trained on a different model (base A): q_proj of "
                                   "layer 0 differs by ")
    assert not (tmp_path / "m.safetensors").exists()
    merged = cli("merge-lora", copy_of(base_file, "bf16", tmp_path), adapters_file, "--out", tmp_path / "m.safetensors")
    assert merged.exit_code == 0 and merged.stderr == "", merged.output
    assert (tmp_path / "m.safetensors").exists()
