"""Progress of long work on stderr. On a terminal, a bar that redraws itself; anywhere else (nohup, CI,
a log file) nothing redraws, so a plain line at least every tenth of the work or every 30 seconds.
Either way, once the first items are timed, one line with the estimated time for the whole."""
import sys
import time

import click

from ..config import human_duration

TIMED_ITEMS, TIMED_SECONDS = 5, 10.0  # the estimate comes after this many items past the first, or seconds


class Progress:
    """`with Progress(total, "training", "step") as progress: ... progress.update(item)` for each item
    done, counting on from `start` items done before (a resumed run's steps); describe(item) is the
    text shown beside the count (the loss, the speed). The pace is timed from the first item's end:
    the first also pays for starting up (worker processes, caches, a GPU's kernels). Work that may be
    quick says nothing before quiet_seconds have passed (then its lines follow the same rule)."""

    def __init__(self, total, label, unit, start=0, describe=lambda item: "", every_seconds=30.0, stream=None,
                 clock=time.perf_counter, quiet_seconds=0.0):
        self.total, self.label, self.unit, self.describe = total, label, unit, describe
        self.quiet_seconds = quiet_seconds
        self.every_seconds, self.stream, self.clock = every_seconds, stream or sys.stderr, clock
        self.first = self.done = start
        self.started, self.first_done_at, self.estimated = clock(), None, False
        self.last_line = (start, self.started)  # (items done, when) at the last plain line
        self.bar = None

    def __enter__(self):
        if self.quiet_seconds == 0 and self.stream.isatty():
            self._start_bar()
        return self

    def _start_bar(self, already=0):
        """The terminal's bar, `already` items along."""
        self.bar = click.progressbar(length=self.total - self.first, label=self.label, file=self.stream,
                                     item_show_func=lambda item: item and self.describe(item), show_eta=True)
        self.bar.__enter__()
        self.bar.update(already)

    def __exit__(self, *exception):
        if self.bar is not None:
            self.bar.__exit__(*exception)

    def update(self, item=None):
        self.done += 1
        now = self.clock()
        if self.first_done_at is None:
            self.first_done_at = now
        if now - self.started < self.quiet_seconds:
            return
        if self.bar is None and self.stream.isatty():  # the quiet time is over
            self._start_bar(already=self.done - self.first - 1)
        if self.bar is not None:
            self.bar.update(1, item)
        elif self._line_due(now):
            self._print_line(item, now)
        after_first = self.done - self.first - 1
        if not self.estimated and self.done < self.total and after_first and (
                after_first >= TIMED_ITEMS or now - self.first_done_at >= TIMED_SECONDS):
            self.estimated = True
            left = self.total - self.first
            whole = self.first_done_at - self.started + self._pace(now) * (left - 1)
            self._echo(f"{self.label}: about {human_duration(whole)} for {left:,} {self.unit}s (timed over the first "
                       f"{after_first + 1})")

    def _pace(self, now):
        """Seconds per item after the first (the first's own time while it is the only one)."""
        after_first = self.done - self.first - 1
        return (now - self.first_done_at) / after_first if after_first else now - self.started

    def _line_due(self, now):
        done_then, then = self.last_line
        tenth = max(1, self.total // 10)
        return self.done == self.total or self.done // tenth > done_then // tenth or now - then >= self.every_seconds

    def _print_line(self, item, now):
        self.last_line = (self.done, now)
        details = self.describe(item) if item is not None else ""
        self._echo(f"{self.label}: {self.unit} {self.done:,}/{self.total:,} ({100 * self.done // self.total}%)"
                   f"{'  ' + details if details else ''}  elapsed {human_duration(now - self.started)}  "
                   f"ETA {human_duration(self._pace(now) * (self.total - self.done))}")

    def _echo(self, line):
        if self.bar is not None:
            line = "\n" + line  # below the bar, which redraws itself on the next update
        click.echo(line, file=self.stream)


class Stages:
    """Progress of work in named stages, fed as on_progress(stage, done, total): a Progress for each
    stage, closed when the stage is done or the next begins. Call close() when the work ends."""

    def __init__(self, unit="batch", **settings):
        self.unit, self.settings, self.stage, self.progress = unit, settings, None, None

    def __call__(self, stage, done, total):
        if stage != self.stage:
            self.close()
            self.stage, self.progress = stage, Progress(total, stage, self.unit, **self.settings).__enter__()
        self.progress.update()
        if done == total:
            self.close()

    def close(self):
        if self.progress is not None:
            self.progress.__exit__(None, None, None)
        self.stage, self.progress = None, None
