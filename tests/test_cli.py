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
