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
model, or only into its LoRA adapters (adapters.py). Texts of one batch are padded on the right: causal
attention never lets a position see later ones, so padding cannot change a text's last hidden state.
"""
import dataclasses
import json
import os
import re

import numpy as np

from . import adamw, adapters, backend, model
from .errors import UserError, setting
from .io import files, weights
from .io.tokenizer import TokenizerError
from .ops import cross_entropy, linear
from .runtime import cpu, parallel, quantized

PROMPT = "{text} Overall, the movie was"
SEPARATOR = "|||"


class ClassifyError(UserError):
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
            tokenizer.encode(text, special=False)
        except TokenizerError as error:
            raise ClassifyError(f"{path}, example {number}: {error}") from None


def encode(tokenizer, text, context):
    """BOS (when the model's text begins with one) + the text's tokens, cut to the last `context` tokens."""
    ids = tokenizer.encode(text, bos=tokenizer.add_bos, special=False)
    if len(ids) <= context:
        return ids
    if not tokenizer.add_bos:
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
def zero_shot_scores(params, config, tokenizer, texts, label_names, batch_size=16, context=None,
                     on_batch=lambda done, total: None):
    """(N, C) log-probabilities of each label name completing each text's prompt. A sequence longer
    than context (default: the model's) loses the start of its text, keeping BOS and the label."""
    context = min(context or config.max_position_embeddings, config.max_position_embeddings)
    bos = tokenizer.add_bos
    pairs = []  # (tokens, position of the label's first token) for every text and label
    for text in texts:
        prompt = tokenizer.encode(PROMPT.format(text=text), bos=bos, special=False)
        for name in label_names:
            full = tokenizer.encode(PROMPT.format(text=text) + " " + name, bos=bos, special=False)
            first = next((i for i, (a, b) in enumerate(zip(prompt, full)) if a != b), min(len(prompt), len(full)))
            cut = max(0, len(full) - context)
            if cut:
                full = full[:bos] + full[bos + cut:]
            pairs.append((full, max(first - cut, 1)))
    computed = model.Weights(params, config)
    scores = []
    batches = range(0, len(pairs), batch_size)
    for done, start in enumerate(batches, start=1):
        chunk = pairs[start:start + batch_size]
        tokens, _ = pad([sequence for sequence, _ in chunk])
        h = model.run_stack(computed, model.check_tokens(tokens, config))[0]
        for row, (sequence, first) in enumerate(chunk):
            positions = np.arange(first, len(sequence))  # logits at p − 1 predict the token at p
            logits = backend.to_host(model.logits(computed, h[row, positions - 1])).astype(np.float64)
            log_probs = cross_entropy.log_softmax(logits)
            scores.append(log_probs[np.arange(len(positions)), np.array(sequence)[positions]].sum())
        on_batch(done, len(batches))
    return np.array(scores).reshape(len(texts), len(label_names))


# ---- the classification head ----------------------------------------------------------------------------
HEAD = "head."  # the head's tensors among a fine-tuning run's arrays: head.weight, head.bias


def head_forward(h, weight, bias, labels):
    """h: (B, D), weight: (C, D), bias: (C,), labels: (B,) ints. Returns (loss: float, cache)."""
    logits, linear_cache = linear.forward(h, weight)
    logits += bias
    loss, loss_cache = cross_entropy.forward(logits, labels)
    return float(loss), (linear_cache, loss_cache)


def head_backward(cache, dloss=1.0):
    """Returns dh: (B, D), dW: (C, D), db: (C,) of dloss × the mean cross-entropy."""
    linear_cache, loss_cache = cache
    dz = cross_entropy.backward(dloss, loss_cache)
    dh, dw = linear.backward(dz, linear_cache)
    return dh, dw, dz.sum(axis=0)


def last_hidden(params, config, tokens, lengths, keep_caches=False):
    """The final normed hidden state of each row's last real token: (B, D) (and the caches)."""
    xp = backend.array_module(model.values(params[model.EMBEDDING]))
    rows, last = xp.arange(len(lengths)), xp.asarray(lengths - 1)
    if not keep_caches:
        return model.hidden_states(params, config, tokens)[rows, last]
    h, caches = model.hidden_states_for_training(params, config, tokens)
    return h[rows, last], (h.shape, rows, last, caches)


def batch_loss_and_grads(model_params, config, head, batch, scale=1.0):
    """The batch's [(label, ids)] mean cross-entropy, and the gradients of scale × it for the trained
    model tensors and the head ({"head.weight", "head.bias"})."""
    tokens, lengths = pad([ids for _, ids in batch])
    xp = backend.array_module(model.values(model_params[model.EMBEDDING]))
    labels = xp.asarray([label for label, _ in batch])
    h_last, (shape, rows, last, caches) = last_hidden(model_params, config, tokens, lengths, keep_caches=True)
    loss, cache = head_forward(h_last, head["weight"], head["bias"], labels)
    dh_last, dw, db = head_backward(cache, scale)
    dh = xp.zeros(shape, dtype=dh_last.dtype)
    dh[rows, last] = dh_last
    grads = model.stack_backward(dh, caches)
    grads.update({f"{HEAD}weight": dw, f"{HEAD}bias": db})
    return loss, grads


def shard_loss_and_grads(arrays, config, lora_scale, batch, scale):
    """One shard's loss and gradient (the task each worker runs): arrays hold the model's tensors (with
    LoRA adapters when lora_scale is not None) and the head's."""
    head = {name[len(HEAD):]: value for name, value in arrays.items() if name.startswith(HEAD)}
    model_arrays = {name: value for name, value in arrays.items() if not name.startswith(HEAD)}
    return batch_loss_and_grads(adapters.with_adapters(quantized.from_arrays(model_arrays), lora_scale), config,
                                head, batch, scale)


# ---- fine-tuning ------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Finetuned:
    params: dict          # the model's weights (adapters attached when LoRA was trained)
    head: dict            # {"weight": (C, D), "bias": (C,)}
    dev_accuracies: list  # per epoch
    best_epoch: int


def finetune(params, config, train_set, dev_set, num_labels, epochs=5, lr=1e-4, batch_size=16, lora_rank=0,
             lora_alpha=None, seed=0, weight_decay=0.0, workers=1, on_epoch=lambda epoch, accuracy: None,
             on_batch=lambda epoch, done, total: None):
    """Train a head (and the model, or LoRA adapters of rank lora_rank on q and v) on train_set
    [(label, ids)], keeping the epoch with the best dev accuracy. params: writable device arrays.
    Each batch is cut into `workers` shards, their gradients summed across workers (runtime/parallel.py)."""
    xp, dtype = backend.array_module(params[model.EMBEDDING]), model.default_dtype(params)  # (blocks compute in fp32)
    rng = np.random.default_rng(seed)
    head = {"weight": xp.asarray(rng.standard_normal((num_labels, config.hidden_size)) * 0.02, dtype=dtype),
            "bias": xp.zeros(num_labels, dtype=dtype)}
    lora_alpha = lora_rank if lora_alpha is None else lora_alpha
    scale = lora_alpha / lora_rank if lora_rank else None
    trained = adapters.init_adapters(params, config, ("q_proj", "v_proj"), lora_rank, lora_alpha,
                                     seed) if lora_rank else params
    arrays = {**quantized.as_arrays(params), **trained, **{HEAD + name: value for name, value in head.items()}}
    trained_arrays = {**trained, **{HEAD + name: value for name, value in head.items()}}
    optimizer = adamw.AdamW(lr=lr, weight_decay=weight_decay)
    seam = parallel.workers(min(workers, batch_size))
    best = (-1.0, None, None)
    accuracies = []
    for epoch in range(epochs):
        order = rng.permutation(len(train_set))
        batches = range(0, len(order), batch_size)
        for done, start in enumerate(batches, start=1):
            batch = [train_set[i] for i in order[start:start + batch_size]]
            shards = [[batch[i] for i in rows] for rows in np.array_split(np.arange(len(batch)), min(workers, len(batch)))]
            tasks = [(config, scale, shard, len(shard) / len(batch)) for shard in shards]
            _, grads = seam.run(shard_loss_and_grads, arrays, tasks, list(trained_arrays))
            optimizer.step(trained_arrays, grads)
            on_batch(epoch + 1, done, len(batches))
        model_params = adapters.with_adapters({**params, **trained}, scale)
        accuracy = accuracy_of(predict(model_params, config, head, [ids for _, ids in dev_set], batch_size),
                               [label for label, _ in dev_set])
        accuracies.append(accuracy)
        on_epoch(epoch + 1, accuracy)
        if accuracy > best[0]:
            best = (accuracy, {name: value.copy() for name, value in trained.items()},
                    {name: value.copy() for name, value in head.items()})
    _, best_trained, best_head = best
    best_params = adapters.attach(params, best_trained, scale) if lora_rank else best_trained
    return Finetuned(best_params, best_head, accuracies, int(np.argmax(accuracies)) + 1)


def predict(params, config, head, sequences, batch_size=16, on_batch=lambda done, total: None):
    """The predicted label index of each token sequence."""
    predictions = []
    batches = range(0, len(sequences), batch_size)
    for done, start in enumerate(batches, start=1):
        tokens, lengths = pad(sequences[start:start + batch_size])
        logits = last_hidden(params, config, tokens, lengths) @ head["weight"].T + head["bias"]
        predictions.extend(int(i) for i in backend.to_host(logits.argmax(axis=-1)))
        on_batch(done, len(batches))
    return predictions


def accuracy_of(predictions, labels):
    return float(np.mean(np.array(predictions) == np.array(labels)))


def write_predictions(path, predictions):
    """One predicted label index per line (written atomically)."""
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    files.write_atomically(path, ["".join(f"{p}\n" for p in predictions).encode()])


# ---- a classification run -------------------------------------------------------------------------------
MODES = ("zero-shot", "finetune")


@dataclasses.dataclass
class ClassifySettings:
    """How to classify (the only home of the defaults): mode 'zero-shot' or 'finetune' and the latter's
    training settings."""
    mode: str = "zero-shot"
    epochs: int = 5
    lr: float = 1e-4
    batch_size: int = 16
    lora_rank: int = 0  # > 0: fine-tune LoRA adapters of this rank (on q and v) instead of every weight
    lora_alpha: float = None  # default: the rank
    context: int = None  # tokens kept per text (its end); None: the model's context
    seed: int = 0
    workers: int = None  # fine-tuning's shards per batch, summed across workers; None: parallel.default_count()

    def __post_init__(self):
        if self.mode not in MODES:
            raise ClassifyError(f"{setting('mode')} must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.workers is None and self.mode == "finetune":
            self.workers = parallel.default_count()
        for name in ("epochs", "batch_size", "workers"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ClassifyError(f"{setting(name)} must be at least 1, got {getattr(self, name)}")
        if self.context is not None and self.context < 2:
            raise ClassifyError(f"{setting('context')} must be at least 2, got {self.context}")
        if not 0 < self.lr < float("inf") or self.lora_rank < 0:
            raise ClassifyError(f"{setting('lr')} must be a positive number and {setting('lora_rank')} not negative")
        if self.seed < 0:
            raise ClassifyError(f"{setting('seed')} must not be negative, got {self.seed}")
        if self.lora_alpha is not None and (not self.lora_alpha > 0 or not self.lora_rank):
            raise ClassifyError(f"{setting('lora_alpha')} scales LoRA adapters: it must be positive, with "
                                f"{setting('lora_rank')}")


@dataclasses.dataclass
class SplitResult:
    predictions: list     # label indices
    labels: list          # the file's labels (None for unlabelled texts)

    @property
    def accuracy(self):
        """The share predicted right, or None for unlabelled texts."""
        return None if any(label is None for label in self.labels) else accuracy_of(self.predictions, self.labels)


@dataclasses.dataclass
class Classification:
    splits: dict          # "dev", and "test" when given -> SplitResult
    baseline: float       # the dev set's majority-class accuracy
    best_epoch: int = None


def run(weights_path, label_names_path, dev_path, train_path=None, test_path=None, settings=None,
        dev_out=None, test_out=None, on_ready=lambda examples, baseline: None,
        on_epoch=lambda epoch, accuracy: None, on_progress=lambda stage, done, total: None):
    """Classify the dev (and test) texts with the model in weights_path, zero-shot or after fine-tuning
    on train_path (ClassifySettings); write each split's predictions, one label index per line, to
    dev_out and test_out when given. on_ready(dev examples, majority-class baseline) is called once the
    data and the model are read; on_epoch(epoch, dev accuracy) after each fine-tuning epoch;
    on_progress(stage, batches done, batches in the stage) after each batch of work, stages being
    e.g. 'scoring dev', 'epoch 2', 'predicting test'."""
    settings = settings or ClassifySettings()
    cpu.keep_freed_memory()  # a run's process: activation-sized arrays are freed and made again every step
    if settings.mode == "finetune" and not train_path:
        raise ClassifyError(f"{setting('mode')} finetune needs {setting('train')} examples")
    for flag, out in (("dev_out", dev_out), ("test_out", test_out)):
        if out and os.path.isdir(out):
            raise ClassifyError(f"{setting(flag)} {out} is a directory; give the file to write the predictions to")
    names = read_label_names(label_names_path)
    paths = {"train": train_path, "dev": dev_path, "test": test_path}
    examples = {split: read_examples(path, names, labels_required=split != "test")
                for split, path in paths.items() if path}
    config, params, tokenizer = weights.load(weights_path)
    if tokenizer is None:
        raise ClassifyError(f"{weights_path} has no tokenizer to read the texts with")
    for split, rows in examples.items():
        check_coverage(tokenizer, rows, paths[split])
    params = model.trainable(params)
    blocks = [value for value in params.values() if not backend.is_array(value)]
    if blocks and settings.mode == "finetune" and not settings.lora_rank:
        raise ClassifyError(f"{weights_path} holds quantized weights ({blocks[0].kind}): fine-tuning every weight "
                            f"needs float ones; fine-tune LoRA adapters on them ({setting('lora_rank')})")
    counts = np.bincount([label for label, _ in examples["dev"]], minlength=len(names))
    baseline = float(counts.max() / counts.sum())
    on_ready(len(examples["dev"]), baseline)
    window = min(settings.context or config.max_position_embeddings, config.max_position_embeddings)
    best_epoch = None
    if settings.mode == "zero-shot":
        predictions = {split: zero_shot_scores(params, config, tokenizer, [text for _, text in rows], names,
                                               settings.batch_size, window,
                                               lambda done, total: on_progress(f"scoring {split}", done, total)
                                               ).argmax(axis=1).tolist()
                       for split, rows in examples.items()}
    else:
        encoded = {split: [(label, encode(tokenizer, text, window)) for label, text in rows]
                   for split, rows in examples.items()}
        tuned = finetune(params, config, encoded["train"], encoded["dev"], len(names), settings.epochs, settings.lr,
                         settings.batch_size, settings.lora_rank, settings.lora_alpha, settings.seed,
                         workers=settings.workers, on_epoch=on_epoch,
                         on_batch=lambda epoch, done, total: on_progress(f"epoch {epoch}", done, total))
        best_epoch = tuned.best_epoch
        predictions = {split: predict(tuned.params, config, tuned.head, [ids for _, ids in rows], settings.batch_size,
                                      lambda done, total: on_progress(f"predicting {split}", done, total))
                       for split, rows in encoded.items() if split != "train"}
    for split, out in (("dev", dev_out), ("test", test_out)):
        if out and split in predictions:
            write_predictions(out, predictions[split])
    splits = {split: SplitResult(predictions[split], [label for label, _ in examples[split]])
              for split in ("dev", "test") if split in predictions}
    return Classification(splits, baseline, best_epoch)
