"""Progress of long work on stderr. On a terminal, a bar that redraws itself; anywhere else (nohup, CI,
a log file) nothing redraws, so a plain line at least every tenth of the work or every 30 seconds.
Either way, once the first items are timed, one line with the estimated time for the whole."""
import sys
import time

import click

TIMED_ITEMS, TIMED_SECONDS = 5, 10.0  # the estimate comes after this many items, or seconds if sooner


def duration(seconds):
    """95 -> '1m35s'; 4000 -> '1h06m'."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """`with Progress(total, "training", "step") as progress: ... progress.update(item)` for each item
    done, counting on from `start` items done before (a resumed run's steps); describe(item) is the
    text shown beside the count (the loss, the speed)."""

    def __init__(self, total, label, unit, start=0, describe=lambda item: "", every_seconds=30.0, stream=None):
        self.total, self.label, self.unit, self.describe = total, label, unit, describe
        self.every_seconds, self.stream = every_seconds, stream or sys.stderr
        self.first = self.done = start
        self.started, self.estimated = time.perf_counter(), False
        self.last_line = (start, self.started)  # (items done, when) at the last plain line
        self.bar = None

    def __enter__(self):
        if self.stream.isatty():
            self.bar = click.progressbar(length=self.total - self.first, label=self.label, file=self.stream,
                                         item_show_func=lambda item: item and self.describe(item), show_eta=True)
            self.bar.__enter__()
        return self

    def __exit__(self, *exception):
        if self.bar is not None:
            self.bar.__exit__(*exception)

    def update(self, item=None):
        self.done += 1
        now = time.perf_counter()
        if self.bar is not None:
            self.bar.update(1, item)
        elif self._line_due(now):
            self._print_line(item, now)
        timed = self.done - self.first
        if not self.estimated and self.done < self.total and (timed >= TIMED_ITEMS or
                                                              now - self.started >= TIMED_SECONDS):
            self.estimated = True
            left = self.total - self.first
            self._echo(f"{self.label}: about {duration((now - self.started) / timed * left)} for {left:,} "
                       f"{self.unit}s (timed over the first {timed})")

    def _line_due(self, now):
        done_then, then = self.last_line
        tenth = max(1, self.total // 10)
        return self.done == self.total or self.done // tenth > done_then // tenth or now - then >= self.every_seconds

    def _print_line(self, item, now):
        self.last_line = (self.done, now)
        elapsed = now - self.started
        left = elapsed / (self.done - self.first) * (self.total - self.done)
        details = self.describe(item) if item is not None else ""
        self._echo(f"{self.label}: {self.unit} {self.done:,}/{self.total:,} ({100 * self.done // self.total}%)"
                   f"{'  ' + details if details else ''}  elapsed {duration(elapsed)}  ETA {duration(left)}")

    def _echo(self, line):
        if self.bar is not None:
            line = "\n" + line  # below the bar, which redraws itself on the next update
        click.echo(line, file=self.stream)


class Stages:
    """Progress of work in named stages, fed as on_progress(stage, done, total): a Progress for each
    stage, closed when the stage is done or the next begins. Call close() when the work ends."""

    def __init__(self, unit="batch"):
        self.unit, self.stage, self.progress = unit, None, None

    def __call__(self, stage, done, total):
        if stage != self.stage:
            self.close()
            self.stage, self.progress = stage, Progress(total, stage, self.unit).__enter__()
        self.progress.update()
        if done == total:
            self.close()

    def close(self):
        if self.progress is not None:
            self.progress.__exit__(None, None, None)
        self.stage, self.progress = None, None
