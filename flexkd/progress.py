"""Progress of long loops: a tqdm bar on a terminal, log lines otherwise.

tqdm draws nothing when stderr is not a terminal (`make run > log`, a batch job), so a long
stage would look hung; there `progress()` logs "importance probe: 40/100, elapsed 0m31s, eta
0m46s" at every tenth of the work or every 30 s, whichever comes first; short loops stay
silent. The training loops log the same lines (flexkd.training.ProgressLog)."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


def clock(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s"


class ProgressLine:
    """Logs `name: [unit]done/total, [extra, ]elapsed, eta` to `logger` when one is due: at every
    `fraction` of `total`, or `seconds` after the last line, and at the end; none in the first
    `quiet` seconds (a short loop logs nothing). `start`: work done before
    (a resumed run), which the eta does not count as this run's speed."""

    def __init__(self, name: str, total: int | None, fraction: float = 0.1,
                 seconds: float = 30.0, quiet: float = 10.0, start: int = 0, unit: str = "",
                 logger: logging.Logger = log, timer=time.perf_counter):
        self.name, self.total, self.seconds, self.quiet = name, total, seconds, quiet
        self.unit, self.logger = unit, logger
        self.every = max(round(total * fraction), 1) if total else None
        self.timer = timer
        self.first = self.logged = start
        self.began = self.last = timer()
        self.lines = 0

    def update(self, done: int, extra: str | Callable[[], str] = "") -> str | None:
        """Record `done` units of work; returns the line when one was logged. `extra` may be a
        function, called only when a line is due (reading a GPU loss waits for the device)."""
        now = self.timer()
        finished = self.total is not None and done >= self.total
        step_due = self.every is not None and done // self.every > self.logged // self.every
        due = step_due or now - self.last >= self.seconds or finished
        if done == self.logged or not due or now - self.began < self.quiet:
            return None
        self.logged, self.last = done, now
        self.lines += 1
        elapsed = now - self.began
        parts = [f"{self.unit}{done}/{self.total}" if self.total else f"{self.unit}{done} done"]
        extra = extra() if callable(extra) else extra
        if extra:
            parts.append(extra)
        parts.append(f"elapsed {clock(elapsed)}")
        if self.total and done > self.first:
            parts.append(f"eta {clock(elapsed / (done - self.first) * max(self.total - done, 0))}")
        line = f"{self.name}: " + ", ".join(parts)
        self.logger.info(line)
        return line


def progress(iterable: Iterable[T], desc: str, total: int | None = None, **line_kwargs
             ) -> Iterator[T]:
    """Iterate `iterable` with a tqdm bar on a terminal, else with ProgressLine log lines."""
    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    if _terminal():
        from tqdm.auto import tqdm

        yield from tqdm(iterable, desc=desc, total=total, leave=False)
        return
    line = ProgressLine(desc, total, **line_kwargs)
    for done, item in enumerate(iterable, 1):
        yield item
        line.update(done)  # the consumer has finished with `item`


def _terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False
