"""Classification: the head's backward and the fine-tuning gradient against finite differences (float64),
padding that cannot change a text's logits, zero-shot scores as label log-probabilities, and the CLI."""
import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

import npllama
from cli import main
from npllama import backend, classify, lora, train, weights
from npllama.tokenizer import CharTokenizer
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
    dh, dw, db = classify.head_backward(classify.head_forward(h, weight, bias, labels)[2])
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
    grads = classify._step_grads(model, CONFIG, head, batch)
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
    assert json.loads(open(os.path.join(CLASSIFY_DATA, "cfimdb-label-mapping.json")).read()) == ["bad", "good"]
    assert train.MODEL_FILE  # (the shared model file is left as it was: classify writes only -out files)


def test_cli_notes_placeholder_test_labels(tiny_classifier_files, tmp_path):
    lines = (tiny_classifier_files / "test.txt").read_text().splitlines()
    (tmp_path / "hidden.txt").write_text("".join("0 ||| " + line.split(" ||| ", 1)[1] + "\n" for line in lines))
    result = classify_cli(tiny_classifier_files, "--mode", "zero-shot", "--test", tmp_path / "hidden.txt")
    assert result.exit_code == 0 and "every test label is 'bad': placeholders?" in result.stderr
