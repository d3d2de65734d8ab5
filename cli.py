#!/usr/bin/env python3
"""npllama's command line: parses flags, calls the library, prints. No math lives here."""
import click

from npllama.config import PRESETS, LlamaConfig, human_count


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """npllama: LLaMA in NumPy/CuPy with every forward and backward pass written out.

    Run `python cli.py COMMAND --help` for a command's options."""


@main.command()
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


if __name__ == "__main__":
    main()
