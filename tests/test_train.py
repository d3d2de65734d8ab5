"""Training: gradient accumulation, exact resume, the NaN guard, logs, and the train/eval CLI end to end."""
import csv
import math
import os
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from npllama.cli import main
from npllama import LlamaConfig, backend, init_params, loss_and_grads, model, train
from npllama.io import safetensors_file, weights
from npllama.io.tokenizer import CharTokenizer
from tests.conftest import ROOT

TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
        "First Citizen:\nYou are all resolved rather to die than to famish?\n\n") * 12
SHAPE_FLAGS = ["--dim", "16", "--n-layers", "1", "--n-heads", "2", "--hidden", "32", "--context", "16"]
RUN_FLAGS = ["--batch-size", "4", "--eval-interval", "5", "--eval-iters", "2", "--sample-tokens", "8",
             "--warmup", "2", "--device", os.environ.get("NPLLAMA_DEVICE", "cpu")]
TINY_FLAGS = SHAPE_FLAGS + RUN_FLAGS


def tiny_run(directory, dtype="fp32", **settings):
    tokenizer = CharTokenizer.from_text(TEXT)
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16)
    settings = train.TrainSettings(**{"batch_size": 4, "max_iters": 12, "warmup": 2, "eval_interval": 4,
                                      "eval_iters": 2, "sample_tokens": 4, "dtype": dtype, **settings})
    ids = np.array(tokenizer.encode(TEXT), dtype=np.uint16)
    return train.TrainingRun(str(directory), config, model.trainable(init_params(config, seed=5), dtype),
                             tokenizer, settings, ids, {"path": "text", "sha256": "0"})


def logged_losses(directory):
    with open(os.path.join(directory, train.LOG_FILE), newline="") as file:
        return [(int(row["step"]), row["loss"], row["val_loss"]) for row in csv.DictReader(file)]


# ---- the step ---------------------------------------------------------------------------------------
def test_grad_accumulation_of_4_by_3_equals_batch_of_12(xp):
    config = LlamaConfig.preset("tiny")
    params = init_params(config, seed=0, dtype="float64")
    rng = np.random.default_rng(0)
    tokens, targets = rng.integers(0, config.vocab_size, (2, 12, 10))
    whole_loss, whole = loss_and_grads(params, config, tokens, targets)
    parts = [(tokens[i:i + 3], targets[i:i + 3]) for i in range(0, 12, 3)]
    accumulated_loss, accumulated = train.accumulated_loss_and_grads(params, config, parts)
    assert abs(accumulated_loss - whole_loss) < 1e-13
    for name in params:
        assert float(xp.abs(accumulated[name] - whole[name]).max()) <= 1e-13 * float(xp.abs(whole[name]).max())


def test_losses_fall(tmp_path):
    run = tiny_run(tmp_path, max_iters=30, lr=1e-2)
    reports = []
    train.run(run, on_step=reports.append)
    assert [r.step for r in reports] == list(range(1, 31))
    assert np.mean([r.loss for r in reports[-5:]]) < np.mean([r.loss for r in reports[:5]]) - 0.3


# ---- exact resume -----------------------------------------------------------------------------------
def test_interrupted_and_resumed_run_equals_the_uninterrupted_one_bit_for_bit(tmp_path):
    straight = tiny_run(tmp_path / "straight", grad_accum=2)
    assert train.run(straight) == "done"

    first = tiny_run(tmp_path / "resumed", grad_accum=2)
    assert train.run(first, should_stop=lambda: first.step == 7) == "interrupted"
    saved = train.load_checkpoint(str(tmp_path / "resumed"))
    assert saved.state["step"] == 7
    resumed = train.TrainingRun(str(tmp_path / "resumed"), saved.config, saved.params, saved.tokenizer,
                                train.TrainSettings(**saved.state["settings"]),
                                np.array(saved.tokenizer.encode(TEXT), np.uint16), saved.state["data"],
                                saved.optimizer, saved.state["step"], saved.state["rng_state"])
    assert train.run(resumed) == "done"

    assert logged_losses(tmp_path / "resumed") == logged_losses(tmp_path / "straight")
    for name in straight.params:
        assert np.array_equal(backend.to_host(resumed.params[name]), backend.to_host(straight.params[name])), name


def test_checkpoints_with_different_steps_are_refused(tmp_path):
    run = tiny_run(tmp_path, max_iters=4)
    train.run(run)
    weights.save(tmp_path / train.MODEL_FILE, run.config, run.params, run.tokenizer,
                 metadata={train.STEP_KEY: "3"})
    with pytest.raises(train.TrainError, match="model is at step 3 but the optimizer at step 4"):
        train.load_checkpoint(str(tmp_path))


# ---- the NaN guard ------------------------------------------------------------------------------------
def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path):
    run = tiny_run(tmp_path, max_iters=8)
    train.run(run, should_stop=lambda: run.step == 4)  # a checkpoint at step 4
    before = open(tmp_path / train.MODEL_FILE, "rb").read()
    run.settings.max_iters = 8
    run.params["model.norm.weight"][0] = np.nan
    with pytest.raises(train.TrainError, match=r"the loss became nan at step 5; training stopped and the last "
                                               r"checkpoint \(step 4\) in .* is kept"):
        train.run(run)
    assert open(tmp_path / train.MODEL_FILE, "rb").read() == before
    assert run.step == 4


# ---- the CLI --------------------------------------------------------------------------------------------
def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_clear_line(result, fragment):
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:") and fragment in lines[0], result.stderr


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "input.txt"
    path.write_text(TEXT)
    return path


def test_train_generate_eval_end_to_end(tmp_path, text_file):
    out = tmp_path / "run"
    result = cli("train", "--data", text_file, "--out", out, "--max-iters", 10, *TINY_FLAGS)
    assert result.exit_code == 0, result.output
    assert "step 5: train loss" in result.stdout and "step 10: train loss" in result.stdout
    assert "done: step 10" in result.stdout
    assert [line.split("  ")[0] for line in result.stderr.splitlines() if line.startswith("training: step")] == \
        [f"training: step {step}/10 ({10 * step}%)" for step in range(1, 11)]  # stderr is no terminal here
    assert result.stdout.endswith(f"next:\n  python3 cli.py generate --weights {out} --prompt 'First Citizen:'  "
                                  f"# sample from it\n  python3 cli.py train --out {out} --resume --max-iters 20  "
                                  "# train longer\n")
    assert [step for step, _, _ in logged_losses(out)] == list(range(1, 11))
    assert [step for step, _, val in logged_losses(out) if val] == [5, 10]
    assert (out / train.CURVES_FILE).stat().st_size > 10_000

    config, params, tokenizer = weights.load(str(out / train.MODEL_FILE))
    assert tokenizer.vocab_size == len(set(TEXT)) == config.vocab_size
    generated = cli("generate", "--weights", out / train.MODEL_FILE, "--prompt", "First", "-n", 8,
                    "--device", os.environ.get("NPLLAMA_DEVICE", "cpu"), "--temperature", 0)
    assert generated.exit_code == 0 and generated.stdout.startswith("First") and len(generated.stdout) == 5 + 8 + 1

    evaluated = cli("eval", "--weights", out / train.MODEL_FILE, "--data", text_file)
    assert evaluated.exit_code == 0, evaluated.output
    mean, count = train.evaluate_ids(model.trainable(params), config, tokenizer.encode(TEXT))
    assert count == len(TEXT) - 1
    assert evaluated.stdout == f"loss {mean:.4f} nats/token, perplexity {np.exp(mean):.3f}, over {count:,} tokens\n"
    batches = math.ceil(math.ceil(count / 16) / 8)  # windows of the context (16), 8 to a batch
    assert f"evaluating: batch {batches}/{batches} (100%)" in evaluated.stderr


def test_without_matplotlib_a_run_notes_the_missing_curves(tmp_path, text_file, monkeypatch):
    """matplotlib is a dependency, but an environment updated without reinstalling may lack it."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail as if not installed
    result = cli("train", "--data", text_file, "--out", tmp_path / "run", "--max-iters", 2, *TINY_FLAGS)
    assert result.exit_code == 0, result.output
    assert "matplotlib is not installed: no curves.png" in result.stdout and "next:" in result.stdout
    assert train.plot_curves(tmp_path / "run") is None and not (tmp_path / "run" / train.CURVES_FILE).exists()


def test_train_without_data_uses_the_builtin_corpus(tmp_path):
    result = cli("train", "--out", tmp_path / "run", "--max-iters", 2, *TINY_FLAGS)
    assert result.exit_code == 0, result.output
    assert "training and" in result.stdout and "done: step 2" in result.stdout


def test_bpe_tokenizer_and_init_from_weights(tmp_path, text_file):
    first = cli("train", "--data", text_file, "--out", tmp_path / "bpe", "--tokenizer", "bpe:300",
                "--max-iters", 2, *TINY_FLAGS)
    assert first.exit_code == 0, first.output
    _, _, tokenizer = weights.load(str(tmp_path / "bpe" / train.MODEL_FILE))
    assert tokenizer.kind == "sentencepiece" and tokenizer.vocab_size == 300
    tuned = cli("train", "--data", text_file, "--out", tmp_path / "tuned", "--init", tmp_path / "bpe" / train.MODEL_FILE,
                "--max-iters", 2, *RUN_FLAGS)
    assert tuned.exit_code == 0, tuned.output
    assert weights.load(str(tmp_path / "tuned" / train.MODEL_FILE))[2].model_bytes == tokenizer.model_bytes


# ---- bad input ------------------------------------------------------------------------------------------
def test_missing_data_file(tmp_path):
    assert_one_clear_line(cli("train", "--data", tmp_path / "nope.txt", "--out", tmp_path / "r"),
                          f"{tmp_path / 'nope.txt'}' does not exist")


def test_empty_data_file(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    assert_one_clear_line(cli("train", "--data", tmp_path / "empty.txt", "--out", tmp_path / "r"), "empty")


def test_data_shorter_than_one_context_window(tmp_path):
    (tmp_path / "short.txt").write_text("to be or not to be")
    assert_one_clear_line(cli("train", "--data", tmp_path / "short.txt", "--out", tmp_path / "r", *TINY_FLAGS),
                          "fewer than one context window")


def test_non_utf8_data_names_the_byte_offset(tmp_path):
    (tmp_path / "latin1.txt").write_bytes(TEXT.encode() + b"caf\xe9\n")
    assert_one_clear_line(cli("train", "--data", tmp_path / "latin1.txt", "--out", tmp_path / "r"),
                          f"offset {len(TEXT.encode()) + 3}")


def test_resume_without_a_checkpoint(tmp_path, text_file):
    assert_one_clear_line(cli("train", "--data", text_file, "--out", tmp_path / "none", "--resume"),
                          "has no checkpoint")


def test_resume_refuses_settings_that_change_the_updates(tmp_path, text_file):
    cli("train", "--data", text_file, "--out", tmp_path / "r", "--max-iters", 2, *TINY_FLAGS)
    assert_one_clear_line(cli("train", "--out", tmp_path / "r", "--resume", "--lr", "0.5"), "--lr cannot change")


@pytest.mark.parametrize("flag,value", [("--batch-size", 0), ("--max-iters", -5), ("--beta1", 1.0),
                                        ("--val-fraction", 1.0), ("--lr", 0), ("--context", 0)])
def test_out_of_range_flags(tmp_path, text_file, flag, value):
    result = cli("train", "--data", text_file, "--out", tmp_path / "r", flag, value)
    assert result.exit_code == 2 and result.stderr.startswith(f"Error: Invalid value for '{flag}'")
    assert result.stderr.endswith(" (see `python3 cli.py train --help`)\n") and result.stderr.count("\n") == 1
    assert not (tmp_path / "r").exists()


def test_init_weights_whose_tokenizer_does_not_cover_the_data(tmp_path, text_file):
    cli("train", "--data", text_file, "--out", tmp_path / "r", "--max-iters", 2, *TINY_FLAGS)
    (tmp_path / "other.txt").write_text(TEXT + "Zebra!\n")
    assert_one_clear_line(cli("train", "--data", tmp_path / "other.txt", "--out", tmp_path / "t",
                              "--init", tmp_path / "r" / train.MODEL_FILE),
                          f"'Z' at offset {len(TEXT)} is not in its vocabulary")


def test_an_existing_run_is_not_overwritten(tmp_path, text_file):
    cli("train", "--data", text_file, "--out", tmp_path / "r", "--max-iters", 2, *TINY_FLAGS)
    before = {name: (tmp_path / "r" / name).read_bytes() for name in os.listdir(tmp_path / "r")}
    assert_one_clear_line(cli("train", "--data", text_file, "--out", tmp_path / "r", *TINY_FLAGS),
                          "already holds a training run")
    assert {name: (tmp_path / "r" / name).read_bytes() for name in os.listdir(tmp_path / "r")} == before


def test_eval_of_weights_without_a_tokenizer(tmp_path, text_file):
    stories = os.path.join(ROOT, "..", "shared", "data", "stories260K.bin")
    assert_one_clear_line(cli("eval", "--weights", stories, "--data", text_file), "has no tokenizer")


def test_saved_optimizer_state_holds_both_moments(tmp_path):
    run = tiny_run(tmp_path, max_iters=4)
    train.run(run)
    _, tensors = safetensors_file.read(str(tmp_path / train.OPTIMIZER_FILE))
    assert sorted(tensors) == sorted(f"{kind}/{name}" for kind in ("m", "v") for name in run.params)


@pytest.mark.parametrize("length", [33, 40])  # exactly two windows of 16, and a ragged last window
def test_evaluate_ids_predicts_every_token_after_the_first_once(length):
    from npllama import forward
    config = LlamaConfig(vocab_size=20, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16)
    params = init_params(config, seed=2, dtype="float64")
    ids = np.random.default_rng(3).integers(0, 20, length)
    nll = []
    for start in range(0, length - 1, 16):  # windows of 16 predictions, each seeing its own tokens only
        window = ids[start:start + 17]
        logits = backend.to_host(forward(params, config, window[None, :-1])[0])
        log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        nll += list(-log_probs[np.arange(len(window) - 1), window[1:]])
    mean, count = train.evaluate_ids(params, config, ids, batch_size=2)
    assert count == length - 1 == len(nll)
    assert abs(mean - np.mean(nll)) < 1e-12


# ---- found in review --------------------------------------------------------------------------------
def test_samples_start_from_the_data_when_the_vocabulary_has_no_newline(tmp_path):
    (tmp_path / "flat.txt").write_text("abcdefghij klmnop qrstuv wxyz " * 20)
    result = cli("train", "--data", tmp_path / "flat.txt", "--out", tmp_path / "r", "--max-iters", 5, *TINY_FLAGS)
    assert result.exit_code == 0, result.output
    sample = result.stdout.split("step 5: train loss")[1].splitlines()[1]
    assert sample.startswith("  a") and len(sample) > 3  # the first training token, then generated text


def test_a_diverging_run_stops_with_one_line_and_saves_nothing_non_finite(tmp_path, text_file):
    result = cli("train", "--data", text_file, "--out", tmp_path / "r", "--max-iters", 50, "--lr", 1e39,
                 "--grad-clip", 0, "--warmup", 0, *SHAPE_FLAGS, "--eval-interval", 1, "--eval-iters", 1)
    assert_one_clear_line(result, "Error: the mean train loss became nan at step 1")
    assert "--lr" in result.stderr
    assert "Warning" not in result.stderr
    assert not (tmp_path / "r" / train.MODEL_FILE).exists()  # the step-1 evaluation was not finite: no save


def test_init_may_shorten_the_training_window(tmp_path, text_file):
    cli("train", "--data", text_file, "--out", tmp_path / "base", "--max-iters", 1, *TINY_FLAGS)
    result = cli("train", "--data", text_file, "--out", tmp_path / "tuned", "--init",
                 tmp_path / "base" / train.MODEL_FILE, "--context", 8, "--max-iters", 2, *RUN_FLAGS)
    assert result.exit_code == 0, result.output
    config, _, _ = weights.load(str(tmp_path / "tuned" / train.MODEL_FILE))
    assert config.max_position_embeddings == 16  # the model keeps its context
    rows = logged_losses(tmp_path / "tuned")
    assert [step for step, _, _ in rows] == [1, 2]
    too_long = cli("train", "--data", text_file, "--out", tmp_path / "t2", "--init",
                   tmp_path / "base" / train.MODEL_FILE, "--context", 32, *RUN_FLAGS)
    assert_one_clear_line(too_long, "--context 32 is longer than the model's context (16)")
    assert not (tmp_path / "t2").exists()


def test_resume_from_a_foreign_optimizer_file(tmp_path, text_file):
    cli("train", "--data", text_file, "--out", tmp_path / "r", "--max-iters", 2, *TINY_FLAGS)
    model = (tmp_path / "r" / train.MODEL_FILE).read_bytes()
    (tmp_path / "r" / train.OPTIMIZER_FILE).write_bytes(model)
    assert_one_clear_line(cli("train", "--out", tmp_path / "r", "--resume"), "is not an npllama training checkpoint")


def test_resume_below_the_reached_step(tmp_path, text_file):
    cli("train", "--data", text_file, "--out", tmp_path / "r", "--max-iters", 4, *TINY_FLAGS)
    assert_one_clear_line(cli("train", "--out", tmp_path / "r", "--resume", "--max-iters", 2),
                          "--max-iters 2 is below the run's step 4")


def test_out_naming_a_file(tmp_path, text_file):
    assert_one_clear_line(cli("train", "--data", text_file, "--out", text_file), "is a file")
    assert text_file.read_text() == TEXT


def test_a_run_that_cannot_start_leaves_no_directory(tmp_path):
    (tmp_path / "short.txt").write_text("to be or not to be")
    cli("train", "--data", tmp_path / "short.txt", "--out", tmp_path / "r", *TINY_FLAGS)
    assert not (tmp_path / "r").exists()


def test_log_records_lr_and_gradient_norm(tmp_path):
    run = tiny_run(tmp_path, max_iters=3)
    train.run(run)
    with open(tmp_path / train.LOG_FILE, newline="") as file:
        rows = list(csv.DictReader(file))
    settings = run.settings
    from npllama import adamw
    assert [float(r["lr"]) for r in rows] == [adamw.learning_rate(step, settings.lr, settings.min_lr, settings.warmup,
                                                                  settings.decay_iters) for step in range(3)]
    assert all(float(r["grad_norm"]) > 0 and float(r["tokens_per_second"]) > 0 for r in rows)


def test_export_hf_of_a_character_model_notes_the_missing_tokenizer(tmp_path):
    run = tiny_run(tmp_path / "r", max_iters=1)
    train.run(run)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "tokenizer.model").write_bytes(b"an earlier export's tokenizer")
    result = cli("export-hf", tmp_path / "r" / train.MODEL_FILE, tmp_path / "hf", "--force")
    assert result.exit_code == 0, result.output
    assert "HF has no tokenizer format for characters" in result.stderr
    assert sorted(os.listdir(tmp_path / "hf")) == ["config.json", "model.safetensors"]
    assert weights.load(str(tmp_path / "hf"))[0] == run.config


# ---- runs from Python, without the CLI ----------------------------------------------------------------
MODEL_SETTINGS = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
                  "max_position_embeddings": 16}


def library_run(directory, text_file, **settings):
    settings = train.TrainSettings(**{"batch_size": 4, "max_iters": 9, "warmup": 2, "eval_interval": 3,
                                      "eval_iters": 2, "sample_tokens": 4, "workers": 2, **settings})
    return train.start(str(directory), str(text_file), model_settings=MODEL_SETTINGS, settings=settings)


def test_start_and_resume_from_python(tmp_path, text_file):
    straight = library_run(tmp_path / "straight", text_file)
    assert train.run(straight) == "done"
    cut = library_run(tmp_path / "cut", text_file)
    assert train.run(cut, should_stop=lambda: cut.step == 4) == "interrupted"
    resumed = train.resume(str(tmp_path / "cut"), max_iters=9)
    assert resumed.step == 4 and resumed.settings.workers == 2  # the recorded shard count, whatever the machine
    assert train.run(resumed) == "done"
    assert logged_losses(tmp_path / "cut") == logged_losses(tmp_path / "straight")
    for name in straight.params:
        assert np.array_equal(backend.to_host(resumed.params[name]), backend.to_host(straight.params[name])), name


def test_library_errors_name_settings_and_the_cli_names_flags(tmp_path, text_file):
    run = library_run(tmp_path / "r", text_file, max_iters=2)
    train.run(run)
    with pytest.raises(train.TrainError) as error:
        train.resume(str(tmp_path / "r"), lr=0.5)
    assert "lr cannot change (only max_iters, eval_interval, eval_iters, sample_tokens, recompute can)" in str(error.value)
    from npllama.cli import flag
    assert "--lr cannot change (only --max-iters, --eval-interval" in error.value.message(flag)
    with pytest.raises(train.TrainError, match="already holds a training run; pass resume to continue it"):
        library_run(tmp_path / "r", text_file)
    with pytest.raises(train.TrainError, match="workers must be at least 1"):
        library_run(tmp_path / "w", text_file, workers=0)
    assert not (tmp_path / "w").exists()


def test_settings_refuse_what_cannot_train(tmp_path):
    for settings, fragment in (({"dtype": "bf16"}, "dtype must be fp32 or fp64"),
                               ({"lora_rank": 2, "lora_alpha": 0.0, "init": "w"}, "lora_alpha must be positive"),
                               ({"lora_alpha": 4.0}, "lora_alpha scales LoRA adapters: give lora_rank too")):
        with pytest.raises(train.TrainError, match=fragment):
            train.TrainSettings(**settings)


def test_a_lora_run_from_python_adapts_the_init_weights(tmp_path, text_file):
    base = library_run(tmp_path / "base", text_file, max_iters=2)
    train.run(base)
    run = train.start(str(tmp_path / "lora"), str(text_file), settings=train.TrainSettings(
        batch_size=4, max_iters=2, eval_interval=2, eval_iters=1, sample_tokens=0, lora_rank=2,
        init=os.path.relpath(base.checkpoint_file)))
    assert run.settings.init == os.path.abspath(base.checkpoint_file)
    assert sorted(run.params) == sorted(n for n in run.arrays if "lora_" in n)
    for name, value in base.params.items():
        assert np.array_equal(backend.to_host(run.arrays[name]), backend.to_host(value)), name


def test_a_run_outlives_a_closed_pool(tmp_path, text_file):
    run = library_run(tmp_path / "r", text_file)
    run.train_step()
    from npllama.runtime import parallel
    parallel.pool(3)  # another helper count: the pool the run used is closed
    assert run.train_step().step == 2


def test_a_run_directory_is_taken_where_weights_are(tmp_path, text_file):
    """generate, eval, info and export-* read a run directory's model.safetensors."""
    out = tmp_path / "r"
    assert cli("train", "--data", text_file, "--out", out, "--max-iters", 2, *TINY_FLAGS).exit_code == 0
    model_file = out / train.MODEL_FILE
    for args in (["info"], ["generate", "--prompt", "a", "-n", 3, "--seed", 1, "--temperature", 0.8, "--weights"],
                 ["eval", "--data", text_file, "--weights"]):
        from_directory, from_file = cli(*args, out), cli(*args, model_file)
        assert from_directory.exit_code == 0, from_directory.output
        assert from_directory.stdout.replace(str(model_file), "").replace(str(out), "") == \
            from_file.stdout.replace(str(model_file), "")
    assert cli("export-hf", out, tmp_path / "hf").exit_code == 0
    assert_one_clear_line(cli("info", tmp_path), "needs config.json (HF), params.json (Meta) or model.safetensors")
