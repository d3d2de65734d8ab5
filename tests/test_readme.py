"""The README's Python snippets run as written, in a checkout's layout, on the quick start's model."""
import json
import os
import re

import pytest

from npllama import train
from tests.conftest import ROOT

SNIPPETS = re.findall(r"```python\n(.*?)```", open(os.path.join(ROOT, "README.md"), encoding="utf-8").read(), re.S)


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    """A directory laid out as a checkout after the quick start (`npllama train`, briefly here), with
    the classification files a snippet names."""
    directory = tmp_path_factory.mktemp("checkout")
    os.makedirs(directory / "weights")
    quick_start = train.start(str(directory / "runs" / "shakespeare-sample"),
                              settings=train.TrainSettings(max_iters=2, eval_iters=1, sample_tokens=0, workers=1))
    assert train.run(quick_start) == "done"
    (directory / "labels.json").write_text(json.dumps(["negative", "positive"]))
    lines = [f"{i % 2} ||| {'What a noble, gentle heart' if i % 2 else 'A plague on both your houses'}\n"
             for i in range(12)]
    (directory / "train.txt").write_text("".join(lines))
    (directory / "dev.txt").write_text("".join(lines[:6]))
    return directory


def test_the_readme_has_python_snippets():
    assert len(SNIPPETS) >= 4


@pytest.mark.parametrize("number", range(len(SNIPPETS)))
def test_a_readme_snippet_runs_as_written(checkout, monkeypatch, number):
    monkeypatch.chdir(checkout)
    exec(compile(SNIPPETS[number], f"README.md python snippet {number + 1}", "exec"), {})
