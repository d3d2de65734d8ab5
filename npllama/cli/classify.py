"""The classify command: flags in, classify.run called, accuracies out."""
import click

from .. import backend, classify
from .common import device_option, given, setting_option
from .progress import Stages

SETTINGS = classify.ClassifySettings
FINETUNE_ONLY = ("train_path", "lora_rank", "lora_alpha", "epochs", "lr", "seed", "workers")


def _setting(name, kind, **options):
    return setting_option(SETTINGS, name, kind, **options)


@click.command("classify")
@click.option("-m", "--weights", "weights_path", required=True, type=click.Path(exists=True),
              help="An npllama weights file, a run directory, an HF or Meta directory, a GGUF or llama2.c file.")
@click.option("--mode", type=click.Choice(classify.MODES), required=True, help="zero-shot: score each label name "
              "as the text's continuation; finetune: train a head (and the model, or LoRA adapters) on --train.")
@click.option("--train", "train_path", type=click.Path(exists=True, dir_okay=False),
              help="Training examples, `label ||| text` lines (finetune).")
@click.option("--dev", "dev_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Development examples: accuracy each epoch, best epoch kept.")
@click.option("--test", "test_path", type=click.Path(exists=True, dir_okay=False),
              help="Test examples (accuracy printed when they carry labels).")
@click.option("--label-names", "label_names_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="A JSON list of the label names.")
@_setting("lora_rank", click.IntRange(min=0), help="Finetune LoRA adapters (on q and v) of this rank instead of "
          "every weight.")
@click.option("--lora-alpha", type=click.FloatRange(min=0, min_open=True), help="Default: the rank.")
@_setting("epochs", click.IntRange(min=1), help="Passes over --train (finetune).")
@_setting("lr", click.FloatRange(min=0, min_open=True), help="AdamW's learning rate, constant (finetune).")
@_setting("batch_size", click.IntRange(min=1), help="Texts per forward pass.")
@click.option("--context", type=click.IntRange(min=2), help="Tokens kept per text (its end). Default: the model's.")
@_setting("seed", int, help="Seed of the head's and adapters' initial weights and the examples' order (finetune).")
@click.option("--workers", type=click.IntRange(min=1), help="Shards per batch, their gradients summed across "
              "workers (processes on the CPU's cores). Default: NPLLAMA_WORKERS when set, else the usable "
              "cores (1 on a GPU).")
@click.option("--dev-out", type=click.Path(), help="Write the dev predictions here, one label index per line.")
@click.option("--test-out", type=click.Path(), help="Write the test predictions here, one label index per line.")
@device_option
@click.pass_context
def classify_command(ctx, weights_path, train_path, dev_path, test_path, label_names_path, dev_out, test_out, device,
                     **settings):
    """Classify texts with a Llama: zero-shot (label names scored as completions) or fine-tuned (a head on
    the last token's hidden state, training the whole model or LoRA adapters)."""
    if settings["mode"] == "zero-shot":
        finetune_flags = [name for name in FINETUNE_ONLY if given(ctx, name)]
        if finetune_flags:
            raise click.ClickException(f"--{finetune_flags[0].replace('_path', '').replace('_', '-')} is for "
                                       "--mode finetune")
    backend.use(device)
    stages = Stages()
    try:
        result = classify.run(weights_path, label_names_path, dev_path, train_path, test_path, SETTINGS(**settings),
                              dev_out, test_out,
                              on_ready=lambda examples, baseline: click.echo(
                                  f"dev: {examples} examples, majority-class baseline {baseline:.3f}"),
                              on_epoch=lambda epoch, accuracy: click.echo(
                                  f"epoch {epoch}: dev accuracy {accuracy:.3f}"),
                              on_progress=stages)
    finally:
        stages.close()
    if result.best_epoch is not None:
        click.echo(f"best epoch {result.best_epoch}")
    names = classify.read_label_names(label_names_path)
    for split, outcome in result.splits.items():
        _report_accuracy(split, outcome, names)


def _report_accuracy(split, outcome, names):
    if outcome.accuracy is None:
        click.echo(f"{split}: {len(outcome.predictions)} predictions (unlabelled texts: no accuracy)")
        return
    labels = outcome.labels
    click.echo(f"{split} accuracy {outcome.accuracy:.3f} ({len(labels)} examples)")
    if len(set(labels)) == 1 and len(labels) > 1:  # e.g. CFIMDB's test file: its labels are withheld
        click.echo(f"note: every {split} label is {names[labels[0]]!r}: placeholders? The accuracy is then "
                   f"the share of texts predicted {names[labels[0]]!r}", err=True)


COMMANDS = [classify_command]
