"""Progress where no terminal redraws a bar (nohup, CI, a log file): plain lines, an estimate, an ETA."""
import io
import re

from npllama.cli import progress
from npllama.cli.progress import Progress, duration


def lines_of(total, start=0, every_seconds=30.0, items=None):
    stream = io.StringIO()  # not a terminal
    with Progress(total, "training", "step", start=start, describe=lambda item: f"loss {item}",
                  every_seconds=every_seconds, stream=stream) as bar:
        for item in items if items is not None else range(start + 1, total + 1):
            bar.update(item)
    return stream.getvalue().splitlines()


def test_a_plain_line_every_tenth_and_one_estimate():
    lines = lines_of(50)
    counted = [line for line in lines if " step " in line]
    assert [re.search(r"step (\d+)/50 \((\d+)%\)", line).groups() for line in counted] == \
        [(str(5 * k), str(10 * k)) for k in range(1, 11)]
    assert all(re.search(r"  loss \d+  elapsed \d+s  ETA \d+s$", line) for line in counted)
    estimates = [line for line in lines if "about" in line]
    assert len(estimates) == 1 and re.fullmatch(r"training: about \d+s for 50 steps \(timed over the first 5\)",
                                                estimates[0])


def test_a_line_every_30_seconds_however_slow(monkeypatch):
    clock = iter(range(0, 10_000, 31))  # every item takes 31 s: a line for each, though 1000 make a tenth
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    lines = lines_of(1000, items=range(1, 4))
    assert [line.split("  ")[0] for line in lines if " step " in line] == \
        ["training: step 1/1,000 (0%)", "training: step 2/1,000 (0%)", "training: step 3/1,000 (0%)"]
    assert "training: about 8h36m for 1,000 steps (timed over the first 1)" in lines  # 31 s each


def test_a_resumed_run_counts_on_from_its_step():
    lines = lines_of(20, start=10)
    assert lines[0].startswith("training: step 12/20 (60%)")
    assert any("for 10 steps (timed over the first 5)" in line for line in lines)


def test_durations_read_as_people_write_them():
    assert [duration(s) for s in (0.4, 59, 95, 3599, 4000)] == ["0s", "59s", "1m35s", "59m59s", "1h06m"]
