import shutil
import subprocess
import sys

import pytest

from click.testing import CliRunner

from npllama.cli import main
from tests.conftest import ROOT


def test_help_runs_as_a_script():
    result = subprocess.run([sys.executable, "cli.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "Usage: cli.py" in result.stdout and "presets" in result.stdout


def test_presets_lists_sizes():
    result = CliRunner().invoke(main, ["presets"])
    assert result.exit_code == 0
    line = next(line for line in result.output.splitlines() if line.startswith("llama2-70b"))
    assert line.split()[1:6] == ["69B", "8192", "80", "64", "8"]


def test_the_installed_command_and_package(tmp_path):
    """`pip install .` (the README's setup does it, editable) gives the npllama command, the same program
    as cli.py, and `import npllama` from any directory."""
    command = shutil.which("npllama")
    if command is None:
        pytest.skip("npllama is not installed here (python3 -m pip install -e .)")
    result = subprocess.run([command, "presets"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout == CliRunner().invoke(main, ["presets"]).output
    imported = subprocess.run([sys.executable, "-c", "import npllama; print(npllama.LlamaConfig.__module__)"],
                              cwd=tmp_path, capture_output=True, text=True)
    assert imported.returncode == 0 and imported.stdout.strip() == "npllama.config", imported.stderr


def test_version_and_usage_errors_are_one_line():
    from npllama import __version__
    assert "Commands:" in CliRunner().invoke(main, []).output  # the program alone: its help
    assert CliRunner().invoke(main, ["--version"]).output == f"npllama, version {__version__}\n"
    for args, message in ((["trian"], "Error: No such command 'trian'. Did you mean 'train'? (see `python3 cli.py "
                                      "--help`)"),
                          (["--bogus"], "Error: No such option '--bogus'. (see `python3 cli.py --help`)"),
                          (["eval", "--bogus"], "Error: No such option '--bogus'"),
                          (["eval", "-m", "/no/such/model", "--data", "x"], "Error: Invalid value for '-m' / "
                                                                            "'--weights': Path '/no/such/model' "
                                                                            "does not exist.")):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2 and result.stderr.startswith(message) and result.stderr.count("\n") == 1, \
            result.stderr


def test_every_flag_says_what_it_does():
    import click
    for name, command in main.commands.items():
        for parameter in command.params:
            if isinstance(parameter, click.Option):
                assert parameter.help, f"{name} {parameter.opts[-1]} has no help"
