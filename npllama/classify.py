"""Text classification with a Llama: zero-shot by label likelihood, or fine-tuned with a head.

Data: one example per line, `label ||| text`, the label an index into a JSON list of label names
(SST-5: ["awful", "bad", "average", "good", "excellent"]) or one of the names.

Zero-shot. For a text x and label names n_1 … n_C, the prompt p = PROMPT.format(text=x) is followed by
each name's tokens y_1 … y_m, and the label scores
    s_c = Σ_i log P(y_i | p, y_<i)
the log-probability of the name as the prompt's completion; the best score wins.

Fine-tuned. The model reads BOS + x; the final normed hidden state of its last token, h: (B, D), feeds
a linear head (W: (C, D), b: (C,)):
Forward:   z = h Wᵀ + b                                   z: (B, C)
           loss = −(1/B) Σ_b log softmax(z_b)[y_b]
Backward:  dz = (softmax(z) − onehot(y)) / B
           dW = dzᵀ h,   db = Σ_b dz_b,   dh = dz W
dh goes back into the model at each text's last position (zero elsewhere), then through the whole
model, or only into its LoRA adapters (lora.py). Texts of one batch are padded on the right: causal
attention never lets a position see later ones, so padding cannot change a text's last hidden state.
"""
import dataclasses
import json
import os
import re

import numpy as np

from . import adamw, backend, files, lora
from .tokenizer import TokenizerError
from .model import EMBEDDING, head_weight, hidden_states, hidden_states_for_training, stack_backward

PROMPT = "{text} Overall, the movie was"
SEPARATOR = "|||"


class ClassifyError(ValueError):
    """Bad classification input (message is one line, names the file and line)."""


# ---- data ---------------------------------------------------------------------------------------------
def read_label_names(path):
    try:
        with open(path, encoding="utf-8-sig") as file:
            names = json.load(file)
    except FileNotFoundError:
        raise ClassifyError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ClassifyError(f"{path}: not JSON ({error})") from None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n.strip() for n in names):
        raise ClassifyError(f"{path}: label names must be a JSON list of non-empty strings, "
                            f"got {json.dumps(names)[:60]}")
    if len(set(names)) != len(names):
        raise ClassifyError(f"{path}: label names repeat: {names}")
    return names


def read_examples(path, label_names, labels_required=True):
    """[(label index, text)] from `label ||| text` lines (blank lines skipped). Without labels_required,
    a line without the separator is an unlabelled text: (None, text)."""
    try:
        with open(path, encoding="utf-8-sig") as file:  # -sig: a byte-order mark is not part of the text
            lines = file.read().splitlines()
    except (FileNotFoundError, IsADirectoryError):
        raise ClassifyError(f"{path}: no such file") from None
    except UnicodeDecodeError as error:
        raise ClassifyError(f"{path} is not UTF-8 text (byte offset {error.start})") from None
    examples = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        label, separator, text = line.partition(SEPARATOR)
        if not separator and not labels_required:
            examples.append((None, line.strip()))
            continue
        if not separator or not text.strip():
            raise ClassifyError(f"{path}, line {number}: expected 'label ||| text', got {line[:60]!r}")
        examples.append((_label_index(label.strip(), label_names, path, number), text.strip()))
    if not examples:
        raise ClassifyError(f"{path}: no examples (the file is empty)")
    return examples


def _label_index(label, names, path, number):
    if label in names:
        return names.index(label)
    if re.fullmatch(r"[0-9]+", label) and int(label) < len(names):
        return int(label)
    raise ClassifyError(f"{path}, line {number}: label {label!r} is not one of the {len(names)} labels "
                        f"(indices 0-{len(names) - 1} or {', '.join(names)})")


def check_coverage(tokenizer, examples, path):
    """Every text can be encoded (a character tokenizer knows only its training text's characters)."""
    for number, (_, text) in enumerate(examples, start=1):
        try:
            tokenizer.encode(text)
        except TokenizerError as error:
            raise ClassifyError(f"{path}, example {number}: {error}") from None


def encode(tokenizer, text, context):
    """BOS (when the tokenizer has one) + the text's tokens, cut to the last `context` tokens."""
    ids = tokenizer.encode(text, bos=tokenizer.bos_id is not None)
    if len(ids) <= context:
        return ids
    if tokenizer.bos_id is None:
        return ids[-context:]
    return ids[:1] + ids[len(ids) - context + 1:]


def pad(sequences, pad_id=0):
    """Right-padded (B, T) int64 tokens and the lengths (B,)."""
    lengths = np.array([len(s) for s in sequences])
    tokens = np.full((len(sequences), lengths.max()), pad_id, dtype=np.int64)
    for row, sequence in enumerate(sequences):
        tokens[row, :len(sequence)] = sequence
    return tokens, lengths


# ---- zero-shot ------------------------------------------------------------------------------------------
def zero_shot_scores(params, config, tokenizer, texts, label_names, batch_size=16, context=None):
    """(N, C) log-probabilities of each label name completing each text's prompt. A sequence longer
    than context (default: the model's) loses the start of its text, keeping BOS and the label."""
    context = min(context or config.max_position_embeddings, config.max_position_embeddings)
    bos = tokenizer.bos_id is not None
    pairs = []  # (tokens, position of the label's first token) for every text and label
    for text in texts:
        prompt = tokenizer.encode(PROMPT.format(text=text), bos=bos)
        for name in label_names:
            full = tokenizer.encode(PROMPT.format(text=text) + " " + name, bos=bos)
            first = next((i for i, (a, b) in enumerate(zip(prompt, full)) if a != b), min(len(prompt), len(full)))
            cut = max(0, len(full) - context)
            if cut:
                full = full[:bos] + full[bos + cut:]
            pairs.append((full, max(first - cut, 1)))
    head = head_weight(params, config)
    scores = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        tokens, _ = pad([sequence for sequence, _ in chunk])
        h = hidden_states(params, config, tokens)
        for row, (sequence, first) in enumerate(chunk):
            positions = np.arange(first, len(sequence))  # logits at p − 1 predict the token at p
            logits = backend.to_host(h[row, positions - 1] @ lora.base(head).T).astype(np.float64)
            scores.append(_log_softmax(logits)[np.arange(len(positions)), np.array(sequence)[positions]].sum())
    return np.array(scores).reshape(len(texts), len(label_names))


def _log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


# ---- the classification head ----------------------------------------------------------------------------
def head_forward(h, weight, bias, labels):
    """h: (B, D), weight: (C, D), bias: (C,), labels: (B,) ints. Returns (loss: float, logits, cache)."""
    xp = backend.array_module(h)
    logits = h @ weight.T + bias
    shifted = logits - logits.max(axis=-1, keepdims=True)
    probs = xp.exp(shifted)
    probs /= probs.sum(axis=-1, keepdims=True)
    rows = xp.arange(h.shape[0])
    loss = -float(xp.log(probs[rows, labels]).mean())
    return loss, logits, (h, weight, probs, labels)


def head_backward(cache):
    """Returns dh: (B, D), dW: (C, D), db: (C,) of the mean cross-entropy."""
    h, weight, probs, labels = cache
    xp = backend.array_module(h)
    dz = probs.copy()
    dz[xp.arange(h.shape[0]), labels] -= 1
    dz /= h.shape[0]
    return dz @ weight, dz.T @ h, dz.sum(axis=0)


def last_hidden(params, config, tokens, lengths, keep_caches=False):
    """The final normed hidden state of each row's last real token: (B, D) (and the caches)."""
    xp = backend.array_module(lora.base(params[EMBEDDING]))
    rows, last = xp.arange(len(lengths)), xp.asarray(lengths - 1)
    if not keep_caches:
        return hidden_states(params, config, tokens)[rows, last]
    h, caches = hidden_states_for_training(params, config, tokens)
    return h[rows, last], (h.shape, rows, last, caches)


# ---- fine-tuning ------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Finetuned:
    params: dict          # the model's weights (adapters attached when LoRA was trained)
    head: dict            # {"weight": (C, D), "bias": (C,)}
    dev_accuracies: list  # per epoch
    best_epoch: int


def finetune(params, config, train_set, dev_set, num_labels, epochs=5, lr=1e-4, batch_size=16, lora_rank=0,
             lora_alpha=None, seed=0, weight_decay=0.0, on_epoch=lambda epoch, accuracy: None):
    """Train a head (and the model, or LoRA adapters of rank lora_rank on q and v) on train_set
    [(label, ids)], keeping the epoch with the best dev accuracy. params: writable device arrays."""
    xp = backend.array_module(lora.base(params[EMBEDDING]))
    rng = np.random.default_rng(seed)
    head = {"weight": backend.to_device(rng.standard_normal((num_labels, config.hidden_size)) * 0.02,
                                        dtype=lora.base(params[EMBEDDING]).dtype),
            "bias": xp.zeros(num_labels, dtype=lora.base(params[EMBEDDING]).dtype)}
    scale = (lora_alpha or lora_rank) / lora_rank if lora_rank else None
    if lora_rank:
        adapters = lora.init_adapters(params, config, ("q_proj", "v_proj"), lora_rank, lora_alpha or lora_rank, seed)
        model_params, trained = lora.attach(params, adapters, scale), adapters
    else:
        model_params, trained = params, params
    optimizer = adamw.AdamW(lr=lr, weight_decay=weight_decay)
    best = (-1.0, None, None)
    accuracies = []
    for epoch in range(epochs):
        order = rng.permutation(len(train_set))
        for start in range(0, len(order), batch_size):
            batch = [train_set[i] for i in order[start:start + batch_size]]
            grads = _step_grads(model_params, config, head, batch)
            optimizer.step({**trained, **{f"head.{k}": v for k, v in head.items()}}, grads)
        accuracy = accuracy_of(predict(model_params, config, head, [ids for _, ids in dev_set], batch_size),
                               [label for label, _ in dev_set])
        accuracies.append(accuracy)
        on_epoch(epoch + 1, accuracy)
        if accuracy > best[0]:
            best = (accuracy, {name: value.copy() for name, value in trained.items()},
                    {name: value.copy() for name, value in head.items()})
    _, best_trained, best_head = best
    best_params = lora.attach(params, best_trained, scale) if lora_rank else best_trained
    return Finetuned(best_params, best_head, accuracies, int(np.argmax(accuracies)) + 1)


def _step_grads(model_params, config, head, batch):
    """Gradients of the batch's mean cross-entropy for the trained model tensors and the head."""
    tokens, lengths = pad([ids for _, ids in batch])
    labels = backend.to_device(np.array([label for label, _ in batch]))
    h_last, (shape, rows, last, caches) = last_hidden(model_params, config, tokens, lengths, keep_caches=True)
    _, _, cache = head_forward(h_last, head["weight"], head["bias"], labels)
    dh_last, dw, db = head_backward(cache)
    xp = backend.array_module(dh_last)
    dh = xp.zeros(shape, dtype=dh_last.dtype)
    dh[rows, last] = dh_last
    grads = stack_backward(model_params, config, dh, caches)
    grads.update({"head.weight": dw, "head.bias": db})
    return grads


def predict(params, config, head, sequences, batch_size=16):
    """The predicted label index of each token sequence."""
    predictions = []
    for start in range(0, len(sequences), batch_size):
        tokens, lengths = pad(sequences[start:start + batch_size])
        logits = last_hidden(params, config, tokens, lengths) @ head["weight"].T + head["bias"]
        predictions.extend(int(i) for i in backend.to_host(logits.argmax(axis=-1)))
    return predictions


def accuracy_of(predictions, labels):
    return float(np.mean(np.array(predictions) == np.array(labels)))


def write_predictions(path, predictions):
    """One predicted label index per line (written atomically)."""
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    files.write_atomically(path, ["".join(f"{p}\n" for p in predictions).encode()])
