"""Progress log lines for loops whose tqdm bar is invisible (stderr not a terminal)."""

import logging

import flexkd.progress as progress_mod
from flexkd.progress import ProgressLine, clock, progress


class FakeTimer:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_lines_at_every_tenth_and_after_each_quiet_stretch():
    timer = FakeTimer()
    line = ProgressLine("probe", 50, seconds=30.0, quiet=0.0, timer=timer)
    logged = {}
    for done in range(1, 51):
        timer.now += 1.0  # one second per item
        if (text := line.update(done)) is not None:
            logged[done] = text
    assert list(logged) == [5, 10, 15, 20, 25, 30, 35, 40, 45, 50]
    assert logged[20] == "probe: 20/50, elapsed 0m20s, eta 0m30s"
    assert logged[50] == "probe: 50/50, elapsed 0m50s, eta 0m00s"


def test_slow_items_log_every_thirty_seconds_between_tenths():
    timer = FakeTimer()
    line = ProgressLine("teacher test", 1000, seconds=30.0, quiet=0.0, timer=timer)
    logged = []
    for done in range(1, 41):
        timer.now += 12.0  # a tenth (100 items) would take 20 minutes
        if line.update(done):
            logged.append(done)
    # 12 s per item: due at 36 s, 72 s, ... after the last line, i.e. every third item.
    assert logged == list(range(3, 41, 3))


def test_short_loops_stay_silent_and_resumed_work_is_not_speed():
    timer = FakeTimer()
    quiet = ProgressLine("eval", 10, quiet=10.0, timer=timer)
    for done in range(1, 11):
        timer.now += 0.5
        assert quiet.update(done) is None  # 5 s in all: under `quiet`
    timer = FakeTimer()
    resumed = ProgressLine("fit", 100, quiet=0.0, start=60, timer=timer)
    timer.now += 40.0
    # 10 steps in 40 s since the resume: 30 steps left take 120 s, not (40 / 70) * 30.
    assert resumed.update(70, extra="loss 0.5000") == (
        "fit: 70/100, loss 0.5000, elapsed 0m40s, eta 2m00s")
    calls = []
    timer.now += 40.0
    assert resumed.update(80, extra=lambda: calls.append(1) or "lazy") == (
        "fit: 80/100, lazy, elapsed 1m20s, eta 1m20s")
    assert resumed.update(81, extra=lambda: calls.append(1) or "lazy") is None
    assert calls == [1]  # the extra text is computed only for a logged line


def test_unknown_total_logs_on_time_only():
    timer = FakeTimer()
    line = ProgressLine("stream", None, seconds=30.0, quiet=0.0, timer=timer)
    timer.now += 29.0
    assert line.update(1) is None
    timer.now += 1.0
    assert line.update(2) == "stream: 2 done, elapsed 0m30s"


def test_progress_logs_when_stderr_is_not_a_terminal(monkeypatch, caplog):
    monkeypatch.setattr(progress_mod, "_terminal", lambda: False)
    with caplog.at_level(logging.INFO, logger="flexkd.progress"):
        items = list(progress(range(20), "importance probe", quiet=0.0))
    assert items == list(range(20))
    counts = [r.getMessage().split(": ")[1].split(",")[0] for r in caplog.records]
    assert counts == [f"{n}/20" for n in range(2, 21, 2)]


def test_progress_draws_tqdm_on_a_terminal(monkeypatch, caplog):
    monkeypatch.setattr(progress_mod, "_terminal", lambda: True)
    with caplog.at_level(logging.INFO, logger="flexkd.progress"):
        assert list(progress(iter(range(5)), "bar", quiet=0.0)) == list(range(5))
    assert not caplog.records


def test_clock():
    assert clock(0) == "0m00s" and clock(59.6) == "1m00s" and clock(754) == "12m34s"
