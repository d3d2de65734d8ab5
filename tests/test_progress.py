"""Progress where no terminal redraws a bar (nohup, CI, a log file): plain lines, an estimate, an ETA."""
import io
import re

from npllama.cli.progress import Progress
from npllama.config import human_duration


def lines_of(total, start=0, every_seconds=30.0, items=None, clock=None, quiet_seconds=0.0):
    stream = io.StringIO()  # not a terminal
    with Progress(total, "training", "step", start=start, describe=lambda item: f"loss {item}",
                  every_seconds=every_seconds, stream=stream, quiet_seconds=quiet_seconds,
                  **({"clock": clock} if clock else {})) as bar:
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
    assert len(estimates) == 1 and re.fullmatch(r"training: about \d+s for 50 steps \(timed over the first 6\)",
                                                estimates[0])


def test_a_line_every_30_seconds_however_slow():
    ticks = iter(range(0, 10_000, 31))  # every item takes 31 s: a line for each, though 1000 make a tenth
    lines = lines_of(1000, items=range(1, 4), clock=lambda: next(ticks))
    assert [line.split("  ")[0] for line in lines if " step " in line] == \
        ["training: step 1/1,000 (0%)", "training: step 2/1,000 (0%)", "training: step 3/1,000 (0%)"]
    assert "training: about 8h36m for 1,000 steps (timed over the first 2)" in lines  # 31 s each


def test_a_resumed_run_counts_on_from_its_step():
    lines = lines_of(20, start=10)
    assert lines[0].startswith("training: step 12/20 (60%)")
    assert any("for 10 steps (timed over the first 6)" in line for line in lines)


def test_durations_read_as_people_write_them():
    assert [human_duration(s) for s in (0.4, 59, 95, 3599, 4000)] == ["0s", "59s", "1m35s", "59m59s", "1h06m"]


def test_the_estimate_leaves_out_the_first_items_start_up():
    """A first step of 20 s (workers starting, caches filling), then 1 s each: 20 + 99 s for 100 steps,
    where timing the first steps together would say 100 × 20/6 + ... (over 5 minutes)."""
    ticks = iter([0, 20, *range(21, 200)])
    lines = lines_of(100, items=range(1, 11), clock=lambda: next(ticks))
    assert "training: about 1m59s for 100 steps (timed over the first 6)" in lines
    assert lines[-1].endswith("training: step 10/100 (10%)  loss 10  elapsed 29s  ETA 1m30s")  # 1 s a step


def test_quick_work_says_nothing_and_slow_work_speaks_after_its_quiet_time():
    quick = iter([0, *range(1, 12)])  # 1 s a tensor, quiet for 2 s: from the second tensor on, as usual
    lines = lines_of(10, items=range(1, 11), clock=lambda: next(quick), quiet_seconds=2.0)
    assert [line.split("  ")[0] for line in lines if " step " in line] == \
        [f"training: step {n}/10 ({10 * n}%)" for n in range(2, 11)]
    instant = iter([0.0] * 12)
    assert lines_of(10, items=range(1, 11), clock=lambda: next(instant), quiet_seconds=2.0) == []
