import subprocess
import sys

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
