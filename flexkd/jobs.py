"""One job of a run or sweep: status on disk, skip-if-finished, fault isolation, sweep summary.

Every job directory holds `status.json` (running / success / failed, with the reason). In a
multirun a failing job (a bad combination, an OOM, a NaN) is recorded and the sweep goes on,
then exits with status 1; rerunning the same sweep command skips finished jobs and retries
failed or unfinished ones.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import sys
import time
import traceback
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from flexkd.errors import UserError
from flexkd.resolvers import NEUTRAL_KEYS
from flexkd.storage import atomic_write_json, content_hash

log = logging.getLogger(__name__)

STATUS = "status.json"


def read_status(job_dir: Path) -> dict:
    try:
        return json.loads((Path(job_dir) / STATUS).read_text())
    except (OSError, ValueError):
        return {}


def write_status(job_dir: Path, status: str, **fields) -> None:
    previous = read_status(job_dir)
    record = {"status": status, "updated": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "attempts": previous.get("attempts", 0) + (status == "running")}
    record.update(fields)
    atomic_write_json(Path(job_dir) / STATUS, record)


def config_fingerprint(cfg: DictConfig) -> str:
    """What identifies a job's computation: its resolved config minus the neutral keys."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    for key in NEUTRAL_KEYS:
        *parents, leaf = key.split(".")
        node = plain
        for parent in parents:
            node = node.get(parent) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    if plain.get("stage") != "removal":
        # Another stage's settings: a train job keeps the identity it had before they existed.
        plain.pop("removal", None)
    return content_hash(plain)


def claim_job_dir(out: Path, fingerprint: str) -> None:
    """A directory that holds another config's job (same command dir, new overrides) must not
    lend it its checkpoint or its results: start that job afresh."""
    previous = read_status(out).get("config")
    if previous and previous != fingerprint:
        log.warning("%s holds a job with a different config; starting afresh there", out)
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        (out / "results.json").unlink(missing_ok=True)
        (out / STATUS).unlink(missing_ok=True)


def finished_results(job_dir: Path) -> dict | None:
    """The results of a job that already succeeded, else None."""
    if read_status(job_dir).get("status") != "success":
        return None
    try:
        return json.loads((Path(job_dir) / "results.json").read_text())
    except (OSError, ValueError):
        return None


def is_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def run_job(cfg: DictConfig) -> float:
    """The body of run.py: run the pipeline with status tracking and error policy."""
    from flexkd.pipeline import main_metric, output_dir_of

    out = output_dir_of(cfg)
    fingerprint = config_fingerprint(cfg)
    claim_job_dir(out, fingerprint)
    if cfg.resume == "auto" and (done := finished_results(out)) is not None:
        log.info("job already finished (%s); skipping. Use resume=never to run it again.",
                 out / "results.json")
        return main_metric(done)
    write_status(out, "running", config=fingerprint)
    try:
        results = _stage(cfg)(cfg)
    except (Exception, KeyboardInterrupt) as e:
        user_error = isinstance(e, UserError)
        write_status(out, "failed", config=fingerprint, error=f"{type(e).__name__}: {e}",
                     traceback=None if user_error else traceback.format_exc())
        if isinstance(e, KeyboardInterrupt) or cfg.get("debug"):
            raise
        if is_multirun():
            log.error("job failed: %s: %s (recorded in %s; the sweep continues)",
                      type(e).__name__, e, out / STATUS)
            return math.nan
        if user_error:
            print(f"flexkd: error: {e}", file=sys.stderr, flush=True)
            print("flexkd: (run with debug=true for the traceback)", file=sys.stderr, flush=True)
            sys.exit(2)
        raise
    if results is None:  # a DDP rank other than 0: rank 0 records the job
        return math.nan
    write_status(out, "success", config=fingerprint, main_metric=results.get("main_metric"),
                 value=main_metric(results))
    if not cfg.checkpoint.get("keep_last", False):
        # Skipped on rerun, a finished job needs no resume checkpoint.
        from flexkd.checkpointing import drop_resume_checkpoint

        drop_resume_checkpoint(out / "checkpoints")
    return main_metric(results)


def _stage(cfg: DictConfig):
    from flexkd.errors import ConfigError
    from flexkd.pipeline import evaluate_only, run
    from flexkd.removal import run_removal

    stages = {"train": run, "eval": evaluate_only, "removal": run_removal}
    if cfg.stage not in stages:
        raise ConfigError(f"stage={cfg.stage!r}; choose one of {sorted(stages)}")
    return stages[cfg.stage]


class SweepSummary(Callback):
    """Hydra callback: after a multirun, list every job's status in `sweep_summary.json`."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        jobs = []
        for job_dir in sorted((p for p in sweep_dir.iterdir() if p.is_dir()),
                              key=lambda p: (len(p.name), p.name)):
            status = read_status(job_dir)
            if not status:
                continue
            overrides = _job_overrides(job_dir)
            jobs.append({"job": job_dir.name, "status": status.get("status"),
                         "overrides": overrides, "error": status.get("error"),
                         "value": status.get("value"), "attempts": status.get("attempts")})
        counts = {s: sum(j["status"] == s for j in jobs) for s in ("success", "failed", "running")}
        atomic_write_json(sweep_dir / "sweep_summary.json", {"sweep_dir": str(sweep_dir),
                                                             "counts": counts, "jobs": jobs})
        print(f"\nsweep {sweep_dir}: {counts['success']} succeeded, {counts['failed']} failed, "
              f"{counts['running']} unfinished", flush=True)
        for job in jobs:
            if job["status"] != "success":
                print(f"  job {job['job']} {' '.join(job['overrides'])}: {job['status']}: "
                      f"{job['error']}", flush=True)
        if counts["failed"] or counts["running"]:
            print("  rerun the same command to retry them (finished jobs are skipped)", flush=True)
            # Every job ran, but the sweep did not succeed: a script or scheduler chaining on
            # this command must see it (SystemExit passes Hydra's callback guard).
            raise SystemExit(1)


def _job_overrides(job_dir: Path) -> list[str]:
    path = job_dir / ".hydra" / "overrides.yaml"
    try:
        import yaml

        return list(yaml.safe_load(path.read_text()) or [])
    except (OSError, ValueError):
        return []
