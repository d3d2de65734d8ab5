"""What the command modules share: the device flag, reading flags' defaults from the library's settings,
and telling flags the user gave from defaults."""
import dataclasses
import os
import sys

import click

from .. import backend


def device_option(function):
    return click.option("--device", type=click.Choice(backend.DEVICES), default="auto", show_default=True,
                        help="Where the arrays live. auto: NPLLAMA_DEVICE when it is set, else the GPU when CuPy "
                             "finds one, else the CPU.")(function)


def default(settings_class, name):
    """A field's default in a library settings dataclass: the one place defaults are written."""
    return next(field.default for field in dataclasses.fields(settings_class) if field.name == name)


def setting_option(settings_class, name, kind, **options):
    """--name-with-dashes for a settings field, with the field's default."""
    return click.option("--" + name.replace("_", "-"), type=kind, default=default(settings_class, name),
                        show_default=True, **options)


def given(ctx, name):
    """Whether the user gave this parameter (rather than Click filling in its default)."""
    return ctx.get_parameter_source(name) != click.core.ParameterSource.DEFAULT


def refuse_to_overwrite(path, force):
    if os.path.isdir(path):
        raise click.ClickException(f"{path} is a directory, not a file to write")
    if os.path.exists(path) and not force:
        raise click.ClickException(f"{path} exists; pass --force to overwrite it")


def program():
    """How the user started this program, for the commands we suggest: `npllama` or `python3 cli.py`."""
    return "npllama" if os.path.basename(sys.argv[0]) == "npllama" else "python3 cli.py"
