"""What a training run leaves in its directory, read back for `info` without the trainer. train.py
writes these files; it sits above io/, so the names and keys they share are defined here:
    model.safetensors      the npllama weights file; its metadata adds STEP_KEY, the step it holds
    adapters.safetensors   a LoRA run's checkpoint instead: its adapters (weights.save_adapters), STEP_KEY
    optimizer.safetensors  AdamW's moments "m/NAME" and "v/NAME"; metadata TRAIN_KEY: JSON with "step",
                           "settings" (the run's TrainSettings), "data" ({"path", ...}), "elapsed_seconds"
    log.csv                a row per step (LOG_FIELDS); evaluation rows fill train_loss and val_loss
"""
import csv
import json
import os

from .. import dtypes
from ..config import human_count, human_duration
from ..errors import UserError
from . import weights

MODEL_FILE, ADAPTERS_FILE = weights.RUN_MODEL_FILE, "adapters.safetensors"
OPTIMIZER_FILE, LOG_FILE = "optimizer.safetensors", "log.csv"
STEP_KEY, TRAIN_KEY = "npllama.train_step", "npllama.train"
LOG_FIELDS = ["step", "lr", "loss", "grad_norm", "tokens_per_second", "elapsed_seconds", "train_loss", "val_loss"]


def describe(path):
    """What `info` says about path, a few lines: a model (weights.describe), LoRA adapters
    (weights.describe_adapters) or a run's optimizer state, and for a run's file, or a run directory,
    the training that made it (describe_training)."""
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, MODEL_FILE)) \
            and os.path.isfile(os.path.join(path, ADAPTERS_FILE)):
        return describe(os.path.join(path, ADAPTERS_FILE))  # a LoRA run's directory
    kind = weights.detect(path)
    file = os.path.join(path, MODEL_FILE) if kind == "run" else None if os.path.isdir(path) else path
    metadata = weights.read_safetensors(file)[0] if kind in ("npllama", "run") else {}
    if TRAIN_KEY in metadata:
        return _describe_optimizer(file, metadata)
    if weights.ADAPTERS_KEY in metadata:
        lines = [weights.describe_adapters(file)]
    else:
        lines = [weights.describe(*weights.load(path), path=file)]
    if metadata.get(STEP_KEY, "").isdigit():
        lines.append(describe_training(os.path.dirname(os.path.abspath(file)), int(metadata[STEP_KEY])))
    return "\n".join(lines)


def describe_training(directory, step, state=None):
    """Lines on the run in directory, whose checkpoint holds `step`: its settings (from its optimizer
    state, or `state` when given) and the last losses its log.csv has up to that step."""
    state = _train_state(directory) if state is None else state
    settings = state.get("settings") or {}
    trained = f"training    step {step:,}"
    if isinstance(state.get("elapsed_seconds"), (int, float)):
        trained += f" after {human_duration(state['elapsed_seconds'])} of training"
    lines = [trained, *_settings_lines(settings)]
    if isinstance(state.get("data"), dict) and state["data"].get("path"):
        lines.append(f"data        {state['data']['path']}")
    lines.append(f"loss        {_last_losses(os.path.join(directory, LOG_FILE), step)}")
    return "\n".join(lines)


def _settings_lines(settings):
    """The main settings of a run (TrainSettings as a dict), as info lines."""
    try:
        context = settings["context"] or "the model's"
        lines = [f"settings    lr {settings['lr']:g} (min {settings['min_lr']:g}, warmup {settings['warmup']}), "
                 f"batch {settings['batch_size']} × grad_accum {settings['grad_accum']}, "
                 f"context {context}, max_iters {settings['max_iters']:,}"]
        if settings.get("lora_rank"):
            lines.append(f"lora        rank {settings['lora_rank']}, alpha {settings['lora_alpha']:g} on "
                         f"{', '.join(settings['lora_targets'])}; base {settings['init']}")
        return lines
    except (KeyError, TypeError, ValueError):
        return [f"settings    unknown: no readable {OPTIMIZER_FILE} beside it"]


def _describe_optimizer(path, metadata):
    state = _parse_state(metadata)
    if not isinstance(state.get("step"), int):
        raise weights.WeightsError(f"{path}: not an npllama training checkpoint (its {TRAIN_KEY} is damaged)")
    _, tensors = weights.read_safetensors(path)
    moments = [name for name in tensors if name.startswith("m/")]
    count = sum(tensors[name].size for name in moments)
    stored = sorted({dtypes.name(tensors[name].dtype) for name in tensors})
    return "\n".join([f"optimizer   AdamW state of a training run: moments of {count:,} ({human_count(count)}) "
                      f"parameters in {len(moments)} tensors, {', '.join(stored) or 'no dtype'}",
                      describe_training(os.path.dirname(os.path.abspath(path)), state["step"], state)])


def _train_state(directory):
    """The optimizer file's TRAIN_KEY JSON ({} when the file is missing or not one)."""
    path = os.path.join(directory, OPTIMIZER_FILE)
    try:
        return _parse_state(weights.read_safetensors(path)[0]) if os.path.isfile(path) else {}
    except weights.WeightsError:
        return {}


def _parse_state(metadata):
    try:
        state = json.loads(metadata.get(TRAIN_KEY, "{}"))
    except json.JSONDecodeError:
        return {}
    return state if isinstance(state, dict) else {}


def _last_losses(path, step):
    """The last batch loss and the last evaluation in log.csv at or before step, as words."""
    if not os.path.exists(path):
        return f"not logged (no {LOG_FILE})"
    try:
        rows = [row for row in read_log(path) if int(row["step"]) <= step and row["loss"]]
    except LogError as error:
        return f"unreadable: {error.message()}"
    if not rows:
        return f"nothing logged up to step {step:,}"
    words = f"batch {float(rows[-1]['loss']):.4f} at step {rows[-1]['step']}"
    evaluations = [row for row in rows if row["train_loss"] or row["val_loss"]]
    if evaluations:
        last = evaluations[-1]
        scores = [f"{label} {float(last[key]):.4f}" for key, label in (("train_loss", "train"),
                                                                      ("val_loss", "validation")) if last[key]]
        words += f"; evaluated at step {last['step']}: {', '.join(scores)}"
    return words


class LogError(UserError):
    """A run's log.csv that is not one (a damaged file)."""


def read_log(path):
    """The rows of a run's log.csv ([] when there is none), each a dict of LOG_FIELDS' strings. A last
    line without its newline (a write cut short by a kill) is left out; anything else that is not a row
    of LOG_FIELDS with an integer step is a LogError."""
    if not os.path.exists(path):
        return []
    try:
        with open(path, newline="", encoding="utf-8") as file:
            lines = file.read().splitlines(keepends=True)
        if lines and not lines[-1].endswith("\n"):
            lines.pop()
        reader = csv.DictReader(lines, strict=True)
        rows = list(reader)
        if reader.fieldnames != LOG_FIELDS:
            raise ValueError(f"its columns are not {','.join(LOG_FIELDS)}")
        for number, row in enumerate(rows, start=2):
            if None in row or None in row.values() or not row["step"].isdigit():
                raise ValueError(f"line {number} is not a row of the log")
    except (UnicodeDecodeError, csv.Error, ValueError) as error:
        raise LogError(f"{path} is damaged ({error})") from None
    return rows
