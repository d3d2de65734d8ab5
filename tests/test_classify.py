"""Classification: the head's backward and the fine-tuning gradient against finite differences (float64),
padding that cannot change a text's logits, zero-shot scores as label log-probabilities, and the CLI."""
import os

import numpy as np
import pytest
from click.testing import CliRunner

import npllama
from npllama.cli import main
from npllama import adapters as lora, backend, classify
from npllama.io import weights
from npllama.io.tokenizer import CharTokenizer
from tests.conftest import ROOT
from tests.gradcheck import numerical_grad, relative_error
from tests.test_model_gradcheck import random_params
from tests.test_train import assert_one_clear_line

CLASSIFY_DATA = os.path.join(ROOT, "..", "shared", "data", "classify")
CONFIG = npllama.LlamaConfig(vocab_size=13, hidden_size=16, intermediate_size=20, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2)


def test_head_backward(xp, rng):
    h, weight, bias = (xp.asarray(rng.standard_normal(shape)) for shape in ((5, 6), (3, 6), (3,)))
    labels = xp.asarray([0, 2, 1, 2, 2])

    def loss():
        return classify.head_forward(h, weight, bias, labels)[0]
    dh, dw, db = classify.head_backward(classify.head_forward(h, weight, bias, labels)[1])
    for analytic, value in ((dh, h), (dw, weight), (db, bias)):
        assert relative_error(analytic, numerical_grad(loss, value)) < 1e-6


@pytest.mark.parametrize("lora_rank", [0, 2], ids=["whole model", "lora"])
def test_finetuning_gradient_through_the_model(xp, rng, lora_rank):
    params = random_params(CONFIG, xp, rng)
    head = {"weight": xp.asarray(rng.standard_normal((3, 16))), "bias": xp.asarray(rng.standard_normal(3))}
    batch = [(0, [1, 4, 2, 7]), (2, [3, 3]), (1, [5, 6, 7, 8, 9, 2])]  # uneven lengths: padded
    model = params
    if lora_rank:
        adapters = {name: xp.asarray(rng.standard_normal(value.shape) * 0.5) for name, value in
                    lora.init_adapters(params, CONFIG, ("q_proj", "v_proj"), lora_rank, 2, 0).items()}
        model = lora.attach(params, adapters, 1.5)
    grads = classify.batch_loss_and_grads(model, CONFIG, head, batch)[1]
    trained = {**(adapters if lora_rank else params), **{f"head.{k}": v for k, v in head.items()}}
    trained.pop("lm_head.weight", None)  # the LM head is not on the classifier's path: no gradient
    assert sorted(grads) == sorted(trained)

    def loss():
        tokens, lengths = classify.pad([ids for _, ids in batch])
        h = classify.last_hidden(model, CONFIG, tokens, lengths)
        return classify.head_forward(h, head["weight"], head["bias"], xp.asarray([label for label, _ in batch]))[0]
    for name, value in trained.items():
        indices = rng.choice(value.size, size=min(3, value.size), replace=False)
        if name == "model.embed_tokens.weight":  # rows of tokens in the batch (others get no gradient)
            indices = np.array([1, 3, 9]) * 16 + rng.integers(0, 16, 3)
        numeric = numerical_grad(loss, value, indices)
        assert relative_error(backend.to_host(grads[name]).reshape(-1)[indices], numeric) < 1e-6, name


def test_padding_does_not_change_a_texts_logits(xp, rng):
    params = random_params(CONFIG, xp, rng)
    head = {"weight": xp.asarray(rng.standard_normal((3, 16))), "bias": xp.asarray(rng.standard_normal(3))}
    alone = [2, 5, 7]
    tokens, lengths = classify.pad([alone])
    by_itself = classify.last_hidden(params, CONFIG, tokens, lengths) @ head["weight"].T
    tokens, lengths = classify.pad([[1, 2, 3, 4, 5, 6, 7, 8], alone, [9]], pad_id=11)
    in_batch = classify.last_hidden(params, CONFIG, tokens, lengths) @ head["weight"].T
    assert float(xp.abs(in_batch[1] - by_itself[0]).max()) < 1e-12
    assert float(xp.abs(in_batch[0] - by_itself[0]).max()) > 1e-3  # another text: other logits


def test_zero_shot_scores_are_label_log_probabilities():
    tokenizer = CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz ,.OTv")
    config = npllama.LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, intermediate_size=20,
                                 num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=128)
    params = npllama.init_params(config, seed=4, dtype="float64")
    params = {name: value * 20 if value.ndim == 2 else value for name, value in params.items()}
    scores = classify.zero_shot_scores(params, config, tokenizer, ["a fine film", "dull"], ["bad", "good"], batch_size=3)
    for row, text in enumerate(["a fine film", "dull"]):
        for column, name in enumerate(["bad", "good"]):
            prompt = tokenizer.encode(classify.PROMPT.format(text=text))
            full = tokenizer.encode(classify.PROMPT.format(text=text) + " " + name)
            logits = npllama.forward(params, config, np.array([full]))[0]
            log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
                - logits.max(-1, keepdims=True)
            expected = sum(log_probs[i - 1, full[i]] for i in range(len(prompt), len(full)))
            assert abs(scores[row, column] - expected) < 1e-9


# ---- data ------------------------------------------------------------------------------------------------
def test_reads_the_shared_datasets():
    names = classify.read_label_names(os.path.join(CLASSIFY_DATA, "sst-label-mapping.json"))
    assert names == ["awful", "bad", "average", "good", "excellent"]
    dev = classify.read_examples(os.path.join(CLASSIFY_DATA, "sst-dev.txt"), names)
    assert len(dev) == 1101 and {label for label, _ in dev} == set(range(5))
    assert dev[0][1] and " ||| " not in dev[0][1]


@pytest.mark.parametrize("content,fragment", [
    ("0 ||| fine\nno separator here\n", "line 2: expected 'label ||| text'"),
    ("0 ||| fine\n7 ||| out of range\n", "line 2: label '7' is not one of the 2 labels"),
    ("", "no examples (the file is empty)"),
    ("1 ||| \n", "line 1: expected 'label ||| text'"),
])
def test_bad_example_files(tmp_path, content, fragment):
    (tmp_path / "ex.txt").write_text(content)
    with pytest.raises(classify.ClassifyError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        classify.read_examples(str(tmp_path / "ex.txt"), ["bad", "good"])


@pytest.mark.parametrize("content", ['{"0": "bad"}', '"bad"', "[]", "[1, 2]", "not json"])
def test_bad_label_names(tmp_path, content):
    (tmp_path / "names.json").write_text(content)
    with pytest.raises(classify.ClassifyError):
        classify.read_label_names(str(tmp_path / "names.json"))


# ---- the CLI --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_classifier_files(tmp_path_factory):
    """A tiny model with a BPE tokenizer (it covers any text), and a few lines of CFIMDB."""
    directory = tmp_path_factory.mktemp("classify")
    with open(os.path.join(CLASSIFY_DATA, "cfimdb-train.txt")) as file:
        lines = file.read().splitlines()
    (directory / "train.txt").write_text("\n".join(lines[:24]) + "\n")
    (directory / "dev.txt").write_text("\n".join(lines[24:36]) + "\n")
    (directory / "test.txt").write_text("\n".join(lines[36:44]) + "\n")
    text = "\n".join(line.split(" ||| ", 1)[1] for line in lines[:200])
    from npllama import data
    tokenizer = data.make_tokenizer("bpe:300", text, str(directory))
    config = npllama.LlamaConfig(vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=32)
    weights.save(directory / "model.safetensors", config, npllama.init_params(config, seed=0), tokenizer)
    return directory


def classify_cli(files, *args):
    return CliRunner().invoke(main, ["classify", "--weights", str(files / "model.safetensors"), "--dev",
                                     str(files / "dev.txt"), "--label-names",
                                     os.path.join(CLASSIFY_DATA, "cfimdb-label-mapping.json"),
                                     "--device", os.environ.get("NPLLAMA_DEVICE", "cpu"), *map(str, args)])


def test_cli_zero_shot(tiny_classifier_files, tmp_path):
    files = tiny_classifier_files
    result = classify_cli(files, "--mode", "zero-shot", "--test", files / "test.txt", "--dev-out", tmp_path / "d.txt",
                          "--test-out", tmp_path / "t.txt")
    assert result.exit_code == 0, result.output
    assert "majority-class baseline" in result.stdout and "dev accuracy" in result.stdout
    assert "test accuracy" in result.stdout
    predictions = (tmp_path / "d.txt").read_text().split()
    assert len(predictions) == 12 and set(predictions) <= {"0", "1"}
    assert len((tmp_path / "t.txt").read_text().split()) == 8
    progress = [line.split(" (")[0] for line in result.stderr.splitlines() if "batch" in line]
    assert progress[-2:] == ["scoring dev: batch 2/2", "scoring test: batch 1/1"]  # 12 and 8 texts × 2 labels


@pytest.mark.parametrize("extra", [[], ["--lora-rank", "2"]], ids=["whole model", "lora"])
def test_cli_finetune(tiny_classifier_files, tmp_path, extra):
    files = tiny_classifier_files
    result = classify_cli(files, "--mode", "finetune", "--train", files / "train.txt", "--epochs", 2,
                          "--batch-size", 8, "--lr", 1e-3, "--test-out", tmp_path / "t.txt", "--test",
                          files / "test.txt", *extra)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert [line.split(":")[0] for line in lines if line.startswith("epoch")] == ["epoch 1", "epoch 2"]
    best = int(next(line for line in lines if line.startswith("best epoch")).split()[-1])
    epochs = [float(line.split()[-1]) for line in lines if line.startswith("epoch")]
    assert epochs[best - 1] == max(epochs)
    dev = float(next(line for line in lines if line.startswith("dev accuracy")).split()[2])
    assert dev == max(epochs)  # the kept epoch's model predicts the dev set
    assert len((tmp_path / "t.txt").read_text().split()) == 8
    assert "epoch 2: batch 3/3 (100%)" in result.stderr and "predicting test: batch 1/1 (100%)" in result.stderr


def test_cli_bad_inputs(tiny_classifier_files, tmp_path):
    files = tiny_classifier_files
    (tmp_path / "bad.txt").write_text("0 ||| fine\nmissing separator\n")
    assert_one_clear_line(classify_cli(files, "--mode", "finetune", "--train", tmp_path / "bad.txt"),
                          "bad.txt, line 2: expected 'label ||| text'")
    (tmp_path / "names.json").write_text('{"0": "bad"}')
    result = CliRunner().invoke(main, ["classify", "--weights", str(files / "model.safetensors"), "--mode",
                                       "zero-shot", "--dev", str(files / "dev.txt"), "--label-names",
                                       str(tmp_path / "names.json")])
    assert_one_clear_line(result, "must be a JSON list")
    (tmp_path / "empty.txt").write_text("")
    assert_one_clear_line(classify_cli(files, "--mode", "zero-shot", "--test", tmp_path / "empty.txt"),
                          "no examples")
    (tmp_path / "labels.txt").write_text("0 ||| fine\n5 ||| too high\n")
    assert_one_clear_line(classify_cli(files, "--mode", "finetune", "--train", tmp_path / "labels.txt"),
                          "line 2: label '5' is not one of the 2 labels")
    assert_one_clear_line(classify_cli(files, "--mode", "finetune"), "--mode finetune needs --train")
    assert_one_clear_line(classify_cli(files, "--mode", "zero-shot", "--epochs", 3), "--epochs is for --mode finetune")
    (tmp_path / "digit.txt").write_text("² ||| a superscript is not an index\n")
    assert_one_clear_line(classify_cli(files, "--mode", "finetune", "--train", tmp_path / "digit.txt"),
                          "label '²' is not one of the 2 labels")
    assert_one_clear_line(classify_cli(files, "--mode", "zero-shot", "--dev-out", tmp_path),
                          f"--dev-out {tmp_path} is a directory; give the file to write the predictions to")


def test_cli_notes_placeholder_test_labels(tiny_classifier_files, tmp_path):
    lines = (tiny_classifier_files / "test.txt").read_text().splitlines()
    (tmp_path / "hidden.txt").write_text("".join("0 ||| " + line.split(" ||| ", 1)[1] + "\n" for line in lines))
    result = classify_cli(tiny_classifier_files, "--mode", "zero-shot", "--test", tmp_path / "hidden.txt")
    assert result.exit_code == 0 and "every test label is 'bad': placeholders?" in result.stderr


def test_unlabelled_test_texts_get_predictions_and_no_accuracy(tiny_classifier_files, tmp_path):
    (tmp_path / "plain.txt").write_text("\ufeffA wonderful film.\nDreadful.\n")  # a BOM, then plain lines
    result = classify_cli(tiny_classifier_files, "--mode", "zero-shot", "--test", tmp_path / "plain.txt",
                          "--test-out", tmp_path / "out.txt")
    assert result.exit_code == 0, result.output
    assert "test: 2 predictions (unlabelled texts: no accuracy)" in result.stdout
    assert len((tmp_path / "out.txt").read_text().split()) == 2


def test_zero_shot_predicts_the_best_scoring_label(tiny_classifier_files, tmp_path, monkeypatch):
    scores = np.array([[0.0, -5.0], [-3.0, -1.0]] * 6)  # dev has 12 texts: labels 0, 1, 0, 1, ...
    monkeypatch.setattr(classify, "zero_shot_scores", lambda *args, **kwargs: scores[:len(args[3])])
    result = classify_cli(tiny_classifier_files, "--mode", "zero-shot", "--dev-out", tmp_path / "d.txt")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "d.txt").read_text().split() == ["0", "1"] * 6


def test_truncation_keeps_bos_and_the_end_of_the_text():
    tokenizer = npllama.load(os.path.join(ROOT, "tests", "fixtures", "import", "hf"))[2]
    ids = tokenizer.encode("a long enough text to be cut", bos=True)
    assert classify.encode(tokenizer, "a long enough text to be cut", 5) == [ids[0]] + ids[-4:]
    chars = CharTokenizer.from_text("abcdef")
    assert classify.encode(chars, "abcdef", 4) == chars.encode("cdef")


def test_zero_shot_keeps_bos_and_the_label_when_cutting(tiny_classifier_files):
    config, params, tokenizer = npllama.load(str(tiny_classifier_files / "model.safetensors"))
    long_text = "a very long review " * 20
    scores = classify.zero_shot_scores(params, config, tokenizer, [long_text], ["bad", "good"], context=24)
    prompt = classify.PROMPT.format(text=long_text)
    for column, name in enumerate(["bad", "good"]):
        full = tokenizer.encode(prompt + " " + name, bos=True)
        label_tokens = len(full) - len(tokenizer.encode(prompt, bos=True))
        kept = full[:1] + full[len(full) - 23:]
        logits = backend.to_host(npllama.forward(params, config, np.array([kept]))[0]).astype(np.float64)
        log_probs = logits - logits.max(-1, keepdims=True)
        log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
        expected = sum(log_probs[i - 1, kept[i]] for i in range(len(kept) - label_tokens, len(kept)))
        assert abs(scores[0, column] - expected) < 1e-4


@pytest.mark.parametrize("lora_rank", [0, 2], ids=["whole model", "lora"])
def test_finetune_keeps_the_best_epoch(rng, monkeypatch, lora_rank):
    params = npllama.init_params(CONFIG, seed=0)
    originals = {name: value.copy() for name, value in params.items()}
    heads_seen = []
    real_predict = classify.predict

    def recording_predict(model_params, config, head, sequences, batch_size=16):
        heads_seen.append({name: value.copy() for name, value in head.items()})
        return real_predict(model_params, config, head, sequences, batch_size)
    monkeypatch.setattr(classify, "predict", recording_predict)
    accuracies = iter([0.5, 0.9, 0.1])
    monkeypatch.setattr(classify, "accuracy_of", lambda predictions, labels: next(accuracies))
    data = [(int(rng.integers(0, 3)), list(rng.integers(0, 13, 5))) for _ in range(8)]
    tuned = classify.finetune(params, CONFIG, data, data[:4], 3, epochs=3, lr=1e-2, batch_size=4,
                              lora_rank=lora_rank, seed=0)
    assert tuned.best_epoch == 2 and tuned.dev_accuracies == [0.5, 0.9, 0.1]
    for name in ("weight", "bias"):
        np.testing.assert_array_equal(tuned.head[name], heads_seen[1][name])
        assert not np.array_equal(tuned.head[name], heads_seen[2][name])
    if lora_rank:  # only the adapters (and the head) were trained: the base is untouched
        for name, value in originals.items():
            np.testing.assert_array_equal(params[name], value)
        assert isinstance(tuned.params["model.layers.0.self_attn.q_proj.weight"], lora.Frozen)
        assert tuned.params["model.layers.0.self_attn.q_proj.weight"].adapted
        assert not tuned.params["model.layers.0.self_attn.k_proj.weight"].adapted


def test_classification_runs_from_python(tiny_classifier_files, tmp_path):
    files = tiny_classifier_files
    names = os.path.join(CLASSIFY_DATA, "cfimdb-label-mapping.json")
    epochs, ready = [], []
    settings = classify.ClassifySettings(mode="finetune", epochs=2, batch_size=8, lr=1e-3, workers=2)
    result = classify.run(str(files / "model.safetensors"), names, str(files / "dev.txt"), str(files / "train.txt"),
                          str(files / "test.txt"), settings, test_out=str(tmp_path / "t.txt"),
                          on_ready=lambda examples, baseline: ready.append((examples, baseline)),
                          on_epoch=lambda epoch, accuracy: epochs.append(accuracy))
    assert ready[0][0] == 12 and 0.5 <= ready[0][1] <= 1
    assert len(epochs) == 2 and result.splits["dev"].accuracy == max(epochs) == epochs[result.best_epoch - 1]
    assert result.splits["test"].predictions == [int(n) for n in (tmp_path / "t.txt").read_text().split()]
    with pytest.raises(classify.ClassifyError, match="mode finetune needs train examples"):
        classify.run(str(files / "model.safetensors"), names, str(files / "dev.txt"),
                     settings=classify.ClassifySettings(mode="finetune"))


def test_classify_settings_refuse_what_cannot_run():
    for settings, fragment in (({"workers": 0}, "workers must be at least 1"),
                               ({"lora_alpha": 2.0}, "lora_alpha scales LoRA adapters"),
                               ({"mode": "few-shot"}, "mode must be one of zero-shot, finetune")):
        with pytest.raises(classify.ClassifyError, match=fragment):
            classify.ClassifySettings(**settings)
