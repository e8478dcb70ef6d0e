"""Nothing lost: a run killed with SIGKILL mid-training resumes to the same final metrics,
and a sweep isolates a failing job, summarises it, and retries only it on rerun."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow

RUN = ["pair=tiny_encoder", "task=tiny_cls", "strategy=projection", "seed=3",
       "trainer.max_steps=60", "checkpoint.every_n_steps=5", "trainer.deterministic=true",
       "teacher_finetune.max_steps=40", "trainer.enable_progress_bar=false",
       "trainer.precision=32-true"]


def command(out, cache_dir, *extra):
    return [sys.executable, str(ROOT / "run.py"), *RUN, f"cache_dir={cache_dir}",
            f"hydra.run.dir={out}", *extra]


def run_to_end(out, cache_dir, *extra):
    proc = subprocess.run(command(out, cache_dir, *extra), capture_output=True, text=True,
                          timeout=600, cwd=out.parent)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # The batch sampler is fast-forwarded on resume: Lightning's "not resumable" warning is
    # silenced rather than shown to users next to an exact resume.
    assert "not resumable" not in proc.stderr + proc.stdout
    return json.loads((out / "results.json").read_text())


def test_sigkill_mid_training_then_rerun_gives_identical_final_metrics(tmp_path, cache_dir):
    reference = run_to_end(tmp_path / "uninterrupted", cache_dir)
    # A finished job needs no resume checkpoint (it is skipped on rerun): it is deleted.
    assert not (tmp_path / "uninterrupted" / "checkpoints" / "last.ckpt").exists()

    out = tmp_path / "killed"
    out.mkdir()
    proc = subprocess.Popen(command(out, cache_dir), cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    info = out / "checkpoints" / "last.json"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if info.exists() and json.loads(info.read_text())["step"] >= 10:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = json.loads(info.read_text())["step"]
    assert 10 <= killed_at < 60
    assert not (out / "results.json").exists()
    assert json.loads((out / "status.json").read_text())["status"] == "running"

    resumed = run_to_end(out, cache_dir)
    assert resumed["train"]["resumed_from"].endswith("last.ckpt")
    # The reported training time includes the killed attempt's seconds up to its checkpoint.
    before = resumed["train"]["seconds_before_resume"]
    assert before > 0 and resumed["timings"]["distill"] > before
    assert reference["train"]["seconds_before_resume"] == 0
    assert resumed["train"]["steps"] == reference["train"]["steps"] == 60
    assert resumed["metrics"]["student"] == reference["metrics"]["student"]
    assert json.loads((out / "status.json").read_text())["attempts"] == 2

    # A finished run is skipped on rerun; resume=never starts afresh.
    again = subprocess.run(command(out, cache_dir), capture_output=True, text=True, timeout=600)
    assert "already finished" in again.stderr + again.stdout
    assert not (out / "checkpoints" / "last.ckpt").exists()
    fresh = run_to_end(out, cache_dir, "resume=never", "checkpoint.keep_last=true")
    assert fresh["train"]["resumed_from"] is None
    assert fresh["metrics"]["student"] == reference["metrics"]["student"]
    assert json.loads((out / "checkpoints" / "last.json").read_text())["step"] == 60
    assert (out / "checkpoints" / "last.ckpt").stat().st_size > 0


def strategy_of(job: dict) -> str:
    return next(o for o in job["overrides"] if o.startswith("strategy="))


def test_failing_sweep_job_is_isolated_summarised_and_retried_alone(run_cli):
    # strategy=raw cannot run on the d128 -> d32 pair: that job fails, the others finish.
    sweep = ["pair=tiny_encoder", "task=tiny_cls", "strategy=sft,raw,flexkd"]
    first = run_cli(*sweep, multirun=True, check=False)
    assert first.returncode == 1  # every job ran, the sweep did not succeed
    summary = json.loads((first.out_dir / "sweep_summary.json").read_text())
    status = {strategy_of(job): job for job in summary["jobs"]}
    assert summary["counts"] == {"success": 2, "failed": 1, "running": 0}
    assert status["strategy=raw"]["status"] == "failed"
    assert "d_S=32" in status["strategy=raw"]["error"]
    assert "job 1" in first.stdout and "rerun the same command" in first.stdout

    second = run_cli(*sweep, multirun=True, check=False)
    assert second.returncode == 1  # raw fails again
    log = second.stderr + second.stdout
    assert log.count("already finished") == 2
    summary = json.loads((second.out_dir / "sweep_summary.json").read_text())
    retried = {strategy_of(job): job["attempts"] for job in summary["jobs"]}
    assert retried == {"strategy=sft": 1, "strategy=raw": 2, "strategy=flexkd": 1}


def test_a_changed_config_in_the_same_dir_is_run_afresh_not_skipped(run_cli):
    base = ["pair=tiny_encoder", "task=tiny_cls", "strategy=sft"]
    first = run_cli(*base)
    assert first.results()["train"]["steps"] == 6
    again = run_cli(*base, "trainer.max_steps=8")  # same output dir, different computation
    assert "different config" in again.stderr + again.stdout
    assert again.results()["train"]["steps"] == 8
    assert again.results()["train"]["resumed_from"] is None


def test_resume_position_counts_a_short_last_accumulation_window():
    """7 batches an epoch at accumulate 2: Lightning takes 4 optimizer steps an epoch (the last
    one on a single batch), so step 5 resumes at epoch 1, batch 2 — not at batch 10 % 7 = 3."""
    from types import SimpleNamespace

    from flexkd.checkpointing import ResumeCheckpoint
    from flexkd.data.sampling import ResumableBatchSampler

    sampler = ResumableBatchSampler(7 * 4, 4, seed=0, rank=0, world_size=1)
    trainer = SimpleNamespace(global_step=5, accumulate_grad_batches=2,
                              train_dataloader=SimpleNamespace(batch_sampler=sampler))
    ResumeCheckpoint("unused", 5).on_train_start(trainer, None)
    assert sampler.epoch == 1
    assert list(sampler) == sampler.batches(1)[2:]
