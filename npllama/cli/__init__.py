"""npllama's command line: one module per group of commands, each parsing flags, calling the library and
printing. No math and no run logic live here. `npllama COMMAND` (installed) and `python3 cli.py COMMAND`
(from a checkout) are the same program."""
import warnings

import click

from .. import __version__
from ..errors import Notice, UserError
from ..runtime import cpu, distributed
from . import classify, generate, models, train
from .common import program

# Settings the library names in its messages whose flag is not simply --name-with-dashes: the model's.
FLAGS = {field: "--" + flag.replace("_", "-") for flag, field in train.MODEL_FLAGS.items()}


def flag(name):
    """The flag that sets a library setting."""
    return FLAGS.get(name, "--" + name.replace("_", "-"))


class _Commands(click.Group):
    def invoke(self, ctx):
        cpu.keep_freed_memory()  # this process is the command's: arrays freed and made again are reused
        warnings.showwarning = _show_warning
        warnings.simplefilter("always", Notice)  # each is about this command's files: say it every time
        try:
            return super().invoke(ctx)
        except distributed.Stopped:  # another rank of an MPI job failed: rank 0 says why, its status is the job's
            raise SystemExit(0) from None
        except UserError as error:  # bad input: one line ("Error: ..."), exit status 1, no traceback
            raise click.ClickException(_from_this_rank(error.message(flag))) from None
        except click.UsageError as error:  # a command's flag, its value, or the command: one line too
            _quiet_unless_rank_0()
            raise _UsageError.of(error, ctx) from None
        except click.ClickException as error:
            error.message = _from_this_rank(error.message)
            raise
        except OSError as error:  # unreadable files, full disks: the system's reason is the message
            message = f"{error.filename or ''}: {error.strerror or error}".lstrip(": ")
            raise click.ClickException(_from_this_rank(message)) from None


    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.UsageError as error:  # the program's own flags (`npllama --bogus`)
            if type(error).__name__ == "NoArgsIsHelpError":  # `npllama` alone: click shows the help
                raise
            _quiet_unless_rank_0()
            raise _UsageError.of(error) from None


def _quiet_unless_rank_0():
    """Flags every rank of an MPI job parses alike: rank 0 says what is wrong and its exit status is
    the job's; the others end quietly with 0, since mpiexec kills every rank (rank 0 before it has said
    anything) as soon as one ends with an error."""
    if not distributed.speaks_for_the_job():
        raise SystemExit(0)


def _from_this_rank(message):
    """An error of this rank alone (the job's shared ones reach the others as Stopped): named by rank
    when it is not rank 0's."""
    return message if distributed.speaks_for_the_job() else f"rank {distributed.this_rank()}: {message}"


class _UsageError(click.ClickException):
    """A usage error as one line that points to the help, instead of click's usage block."""
    exit_code = 2  # as click's own usage errors

    @classmethod
    def of(cls, error, ctx=None):
        path = (error.ctx or ctx).command_path.split()[1:] if (error.ctx or ctx) else []
        return cls(f"{error.format_message()} (see `{' '.join([program(), *path])} --help`)")


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """A warning is one line for the user ("Warning: ..."), not a source location."""
    click.echo(f"Warning: {message}", err=True)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="npllama")
def main():
    """npllama: LLaMA in NumPy/CuPy with every forward and backward pass written out.

    Run `npllama COMMAND --help` (or `python3 cli.py COMMAND --help`) for a command's options."""


for module in (models, generate, train, classify):
    for command in module.COMMANDS:
        main.add_command(command)
