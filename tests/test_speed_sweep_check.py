"""benchmarks.speed compares two sweeps' wall times only when every job of each succeeded: a
sweep with a failed job has fewer jobs timed (a disk-full store arm once printed 2.34x from 6
of its 15 jobs), and the check names them."""

import json

import pytest

from benchmarks.speed import check_all_succeeded


def _summary(tmp_path, *statuses):
    jobs = [{"job": str(i), "status": s, "overrides": [f"seed={i}"],
             "error": None if s == "success" else "OSError: [Errno 28] No space left on device"}
            for i, s in enumerate(statuses)]
    (tmp_path / "sweep_summary.json").write_text(json.dumps({"jobs": jobs}))


def test_a_sweep_whose_jobs_all_succeeded_is_compared(tmp_path):
    _summary(tmp_path, "success", "success")
    check_all_succeeded(tmp_path)


@pytest.mark.parametrize("statuses", [("success", "failed"), ("running", "success"), ()])
def test_a_failed_unfinished_or_empty_sweep_is_refused_naming_the_jobs(tmp_path, statuses):
    _summary(tmp_path, *statuses)
    with pytest.raises(SystemExit) as err:
        check_all_succeeded(tmp_path)
    bad = [str(i) for i, s in enumerate(statuses) if s != "success"]
    assert f"{len(bad)} of {len(statuses)} jobs" in str(err.value)
    for job in bad:
        assert f"job {job} seed={job}" in str(err.value)


def test_a_sweep_without_a_summary_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="sweep_summary.json"):
        check_all_succeeded(tmp_path)
