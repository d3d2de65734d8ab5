"""Commands on model files: presets, load-weights, info, export-hf, merge-lora, export-gguf."""
import contextlib
import os
import warnings

import click

from ..config import PRESETS, LlamaConfig, human_count
from ..dtypes import QUANTIZED
from ..io import gguf_file, run_files, weights
from .common import refuse_to_overwrite
from .progress import Stages


@click.command()
def presets():
    """List the named model configurations (usable wherever a preset is asked for)."""
    click.echo(f"{'name':<18}{'params':>8}{'dim':>7}{'layers':>8}{'heads':>7}{'kv':>5}{'hidden':>8}"
               f"{'vocab':>8}{'context':>9}  tied")
    for name in PRESETS:
        c = LlamaConfig.preset(name)
        click.echo(f"{name:<18}{human_count(c.num_parameters()):>8}{c.hidden_size:>7}"
                   f"{c.num_hidden_layers:>8}{c.num_attention_heads:>7}{c.num_key_value_heads:>5}"
                   f"{c.intermediate_size:>8}{c.vocab_size:>8}{c.max_position_embeddings:>9}"
                   f"  {'yes' if c.tie_word_embeddings else 'no'}")


@click.command("load-weights")
@click.argument("source", type=click.Path())
@click.option("--out", type=click.Path(), required=True,
              help="The npllama weights file to write (e.g. weights/7b.safetensors).")
@click.option("--tokenizer", "tokenizer_path", type=click.Path(),
              help="A tokenizer file to embed (SentencePiece .model, tokenizer.json). Default: the source's own.")
@click.option("--dtype", type=click.Choice(["keep", "fp32", "fp16", "bf16", *QUANTIZED]), default="keep",
              show_default=True, help="Dtype to store the tensors in; keep: as the source stores them; q8_0, q4_0, "
              "q4_1: llama.cpp's blocks for the matrices (norms fp32; a matrix whose rows are not a multiple of 32 "
              "fp16); fp32, fp16, bf16 dequantize quantized tensors.")
@click.option("--force", is_flag=True, help="Overwrite --out if it exists (default: refuse).")
def load_weights(source, out, tokenizer_path, dtype, force):
    """Import SOURCE into one npllama weights file (config and tokenizer embedded).

    SOURCE is an HF checkpoint directory (config.json, model.safetensors or sharded with an index,
    tokenizer.model), a Meta directory (params.json, consolidated.NN.pth, tokenizer.model; read without
    torch), a llama2.c .bin (legacy, or versioned 'ak42' v1/v2), a GGUF file (llama.cpp's: F32, F16,
    BF16, Q8_0, Q4_0 and Q4_1 kept as they are; Q5_0, Q5_1 and K-quants made Q8_0), or an npllama
    weights file."""
    refuse_to_overwrite(out, force)
    config, params, tokenizer = weights.load(source, tokenizer_path)
    if os.path.dirname(out):
        os.makedirs(os.path.dirname(out), exist_ok=True)
    with _writing(out) as on_tensor:
        weights.save(out, config, params, tokenizer, dtype=None if dtype == "keep" else dtype, on_tensor=on_tensor)
    click.echo(f"wrote {out}")
    with warnings.catch_warnings():  # anything to say about the file was said reading the source
        warnings.simplefilter("ignore")
        click.echo(weights.describe(*weights.load(out), path=out))


@click.command()
@click.argument("path", type=click.Path())
def info(path):
    """Summarise PATH: a model (any source load-weights reads: parameters, shape, dtype, tokenizer), a
    training run or its model (with the step, the last losses and the run's settings), LoRA adapters
    (rank, alpha, targets, base model) or a run's optimizer.safetensors."""
    click.echo(run_files.describe(path))


@click.command("export-hf")
@click.argument("weights_path", metavar="WEIGHTS", type=click.Path())
@click.argument("outdir", type=click.Path())
@click.option("--force", is_flag=True, help="Write into OUTDIR even if it is not empty (default: refuse).")
def export_hf(weights_path, outdir, force):
    """Write WEIGHTS as an HF transformers directory (config.json, model.safetensors and the tokenizer:
    tokenizer.model or tokenizer.json, tokenizer_config.json with the chat template, generation_config.json).
    A quantized model is written in fp32 (its dequantized values, exactly)."""
    if os.path.exists(outdir) and not os.path.isdir(outdir):
        raise click.ClickException(f"{outdir} is a file; OUTDIR names the directory to write")
    if os.path.isdir(outdir) and os.listdir(outdir) and not force:
        raise click.ClickException(f"{outdir} is not empty; pass --force to write into it")
    config, params, tokenizer = weights.load(weights_path)
    with _writing(outdir) as on_tensor:
        written = weights.export_hf(outdir, config, params, tokenizer, on_tensor)
    click.echo(f"wrote {outdir} ({', '.join(written)})")
    if tokenizer is not None and tokenizer.kind == "char":
        click.echo(f"note: HF has no tokenizer format for {tokenizer.describe()}; keep using {weights_path} "
                   "to encode and decode", err=True)


@click.command("merge-lora")
@click.argument("weights_path", metavar="WEIGHTS", type=click.Path())
@click.argument("adapters_path", metavar="ADAPTERS", type=click.Path())
@click.option("--out", type=click.Path(), required=True, help="The standalone weights file to write.")
@click.option("--force", is_flag=True, help="Overwrite --out if it exists (default: refuse).")
def merge_lora(weights_path, adapters_path, out, force):
    """Fold LoRA ADAPTERS (a run's adapters.safetensors) into WEIGHTS: W' = W + (alpha/r)·B A. WEIGHTS
    must be the model they were trained on (in any format or precision)."""
    refuse_to_overwrite(out, force)
    config, params, tokenizer = weights.load(weights_path)
    adapters, info = weights.load_adapters(adapters_path, config, base_params=params)
    with _writing(out) as on_tensor:
        weights.save(out, config, weights.merge_adapters(params, adapters, info["alpha"] / info["rank"]), tokenizer,
                     on_tensor=on_tensor)
    click.echo(f"wrote {out}: {len(adapters) // 2} adapters of rank {info['rank']} merged into {weights_path}")


@click.command("export-gguf")
@click.argument("weights_path", metavar="WEIGHTS", type=click.Path())
@click.argument("out", metavar="OUT.gguf", type=click.Path())
@click.option("--type", "quant_type", type=click.Choice(list(gguf_file.EXPORT_TYPES)), default="f16",
              show_default=True, help="The matrices' type (norms stay f32, as llama.cpp's converter keeps them).")
@click.option("--force", is_flag=True, help="Overwrite OUT.gguf if it exists (default: refuse).")
def export_gguf(weights_path, out, quant_type, force):
    """Write WEIGHTS (anything load-weights reads) as a GGUF file for llama.cpp: the names, metadata and q/k
    row order its converter writes, and the tokenizer."""
    refuse_to_overwrite(out, force)
    config, params, tokenizer = weights.load(weights_path)
    if os.path.dirname(out):
        os.makedirs(os.path.dirname(out), exist_ok=True)
    with _writing(out) as on_tensor:
        weights.export_gguf(out, config, params, tokenizer, quant_type, on_tensor)
    click.echo(f"wrote {out} ({quant_type})")
    if tokenizer is None:
        click.echo(f"note: {weights_path} has no tokenizer, so neither has {out}; llama.cpp needs one to load it",
                   err=True)


@contextlib.contextmanager
def _writing(path):
    """The on_tensor(done, total) of a writer, shown as progress once it has taken 2 s (a 7B model
    takes minutes)."""
    stages = Stages("tensor", quiet_seconds=2.0)
    try:
        yield lambda done, total: stages(f"writing {path}", done, total)
    finally:
        stages.close()


COMMANDS = [presets, load_weights, info, export_hf, merge_lora, export_gguf]
