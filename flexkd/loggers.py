"""Experiment loggers: CSV always; W&B when `logger=wandb`.

Each job gets its own W&B run (created in `build_loggers`, closed in `finish_loggers`), so the
jobs of a Hydra multirun share one process but not one run; they share a W&B group (the sweep).
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from flexkd.errors import ConfigError

log = logging.getLogger(__name__)

LOGGER_NAMES = ("csv", "wandb")
WANDB_MODES = ("online", "offline", "disabled", "shared")
# Older spellings W&B still accepts in $WANDB_MODE.
_MODE_ALIASES = {"dryrun": "offline", "run": "online"}
_MAX_GROUP = 128  # W&B's limit on a group name


# ----------------------------------------------------------------------------- pure helpers

def run_name(meta: Mapping) -> str:
    return f"{meta['strategy']}-{meta['pair']}-{meta['task']}-s{meta['seed']}"


def run_tags(meta: Mapping, extra=()) -> list[str]:
    """pair:/task:/strategy:/seed: tags, then the user's extra tags (duplicates dropped)."""
    tags = [f"pair:{meta['pair']}", f"task:{meta['task']}", f"strategy:{meta['strategy']}",
            f"seed:{meta['seed']}"] + [str(t) for t in (extra or [])]
    return list(dict.fromkeys(tags))


def group_name(path: str | os.PathLike, cwd: str | os.PathLike | None = None) -> str:
    """A W&B group from a sweep/run dir: relative to cwd when below it, POSIX, at most 128 chars."""
    p = Path(path)
    if cwd is not None and p.is_absolute():
        try:
            p = p.relative_to(Path(cwd))
        except ValueError:
            pass
    name = p.as_posix().rstrip("/") or "."
    return name[-_MAX_GROUP:]


def default_group(out: Path, hydra_mode: str | None = None, sweep_dir: str | None = None,
                  cwd: str | None = None) -> str:
    """The sweep dir for multirun jobs (shared by all of them), else the run's own output dir."""
    if hydra_mode is not None and str(hydra_mode).upper().endswith("MULTIRUN") and sweep_dir:
        return group_name(sweep_dir, cwd)
    return group_name(out, cwd)


def resolve_mode(mode: str | None, env: Mapping[str, str] | None = None,
                 logged_in: bool | None = None) -> str:
    """Effective W&B mode: the config's, else $WANDB_MODE, else online with credentials, else offline.

    `logged_in` None: look for credentials ($WANDB_API_KEY, $WANDB_IDENTITY_TOKEN_FILE, or the
    netrc entry `wandb login` writes).
    """
    env = os.environ if env is None else env
    for value, source in ((mode, "logger.mode"), (env.get("WANDB_MODE"), "$WANDB_MODE")):
        if value:
            value = _MODE_ALIASES.get(str(value).lower(), str(value).lower())
            if value not in WANDB_MODES:
                raise ConfigError(f"{source}={value!r} is not a W&B mode; use one of "
                                  f"{', '.join(WANDB_MODES)} (or null: offline unless logged in)")
            return value
    if logged_in is None:
        logged_in = has_wandb_credentials(env)
    return "online" if logged_in else "offline"


def has_wandb_credentials(env: Mapping[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    if env.get("WANDB_API_KEY") or env.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    try:  # the netrc entry `wandb login` writes (wandb's own reader; private API, so guarded)
        from wandb.sdk.lib.wbauth import wbnetrc

        return bool(wbnetrc.read_netrc_auth(
            host=env.get("WANDB_BASE_URL") or "https://api.wandb.ai"))
    except Exception:  # noqa: BLE001 - unreadable/invalid netrc or a changed wandb API: no login
        return False


def check_logger_config(cfg: DictConfig) -> str:
    """The logger name, or a ConfigError listing the valid ones."""
    logger_cfg = cfg.get("logger")
    name = logger_cfg.get("name") if logger_cfg is not None else None
    if name not in LOGGER_NAMES:
        raise ConfigError(f"logger.name={name!r} is not a logger; use one of "
                          f"{', '.join(LOGGER_NAMES)} (e.g. logger=wandb)")
    return name


def flatten(prefix: str, value, out: dict | None = None) -> dict:
    """Nested dicts -> {'a/b/c': scalar}; numbers, bools and strings only (lists/None dropped)."""
    out = {} if out is None else out
    if isinstance(value, Mapping):
        for key, sub in value.items():
            flatten(f"{prefix}/{key}" if prefix else str(key), sub, out)
    elif isinstance(value, bool | int | float | str):
        out[prefix] = value
    return out


def summary_metrics(results: Mapping) -> dict:
    """The run summary: test/<model>/<metric>, validation/<model>/<metric>, params/, time/, probe/."""
    summary: dict = {}
    metrics = dict(results.get("metrics") or {})
    validation = metrics.pop("validation", None) or {}
    flatten("test", metrics, summary)
    flatten("validation", validation, summary)
    flatten("params", results.get("params") or {}, summary)
    flatten("time", results.get("timings") or {}, summary)
    if results.get("main_metric"):
        summary["main_metric"] = results["main_metric"]
    if (results.get("train") or {}).get("steps") is not None:
        summary["train_steps"] = results["train"]["steps"]
    for prefix, probe in probe_entries(results):
        for share, k in (probe.get("effective_dims") or {}).items():
            summary[f"{prefix}/effective_dim_{share}"] = k
        for key in ("stability_overlap", "k", "examples", "cache_hit", "layer", "score",
                    "selection"):
            if isinstance(probe.get(key), bool | int | float | str):
                summary[f"{prefix}/{key}"] = probe[key]
    return summary


def probe_entries(results: Mapping) -> list[tuple[str, dict]]:
    """(key prefix, probe dict): 'probe' for a single probe, 'probe/<i>' for several layer pairs."""
    probes = (results.get("probe") or {}).get("probes") or []
    probes = [p for p in probes if isinstance(p, Mapping)]
    if len(probes) == 1:
        return [("probe", probes[0])]
    return [(f"probe/{i}", p) for i, p in enumerate(probes)]


def sample_rows(samples) -> tuple[list[str], list[list]]:
    """Columns and rows of the eval-sample table; missing keys become empty cells."""
    columns = ["prompt", "reference", "student", "teacher"]
    rows = [["" if s.get(c) is None else str(s.get(c)) for c in columns] for s in samples or []]
    return columns, rows


def artifact_name(meta: Mapping) -> str:
    return re.sub(r"[^\w.-]", "_", f"student-{run_name(meta)}")[:128]


# ----------------------------------------------------------------------------- loggers

def build_loggers(cfg: DictConfig, out: Path, results_meta: dict) -> list:
    """Lightning loggers for one run. `results_meta` has pair, task, strategy, seed."""
    from lightning.pytorch.loggers import CSVLogger

    name = check_logger_config(cfg)
    loggers = [CSVLogger(save_dir=str(out), name="logs", version="")]
    if name == "wandb":
        loggers.append(_build_wandb(cfg, Path(out), results_meta))
    return loggers


def _build_wandb(cfg: DictConfig, out: Path, meta: dict):
    import wandb
    from lightning.pytorch.loggers import WandbLogger
    from lightning.pytorch.utilities import rank_zero_only

    wcfg = cfg.logger
    mode = resolve_mode(wcfg.get("mode"))
    save_dir = Path(wcfg.get("save_dir") or out).expanduser()
    save_dir.mkdir(parents=True, exist_ok=True)
    group = wcfg.get("group") or _hydra_group(out)
    if wandb.run is not None and rank_zero_only.rank == 0:
        # A job that died mid-sweep leaves its run open; WandbLogger would log into it.
        log.warning("finishing a W&B run left open by an earlier job: %s", wandb.run.name)
        wandb.finish(exit_code=1)
    logger = WandbLogger(
        name=run_name(meta), save_dir=str(save_dir), project=wcfg.get("project") or "flexkd",
        log_model=False,  # the student is uploaded by finish_loggers (logger.log_model)
        entity=wcfg.get("entity"), group=group, tags=run_tags(meta, wcfg.get("tags")),
        job_type=wcfg.get("job_type") or "distill", mode=mode,
        config=OmegaConf.to_container(cfg, resolve=True),
    )
    logger.flexkd_log_model = bool(wcfg.get("log_model"))
    if rank_zero_only.rank == 0:
        run = logger.experiment  # start the run now: its dir and id exist from here on
        if mode == "offline":
            sync_dir = Path(run.settings.sync_dir).resolve()
            print(f"flexkd: W&B run {run.id} is offline at {sync_dir}; upload it later with: "
                  f"wandb sync {sync_dir}", flush=True)
    return logger


def _hydra_group(out: Path) -> str:
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            hc = HydraConfig.get()
            return default_group(out, hydra_mode=str(hc.mode), sweep_dir=hc.sweep.dir,
                                 cwd=hc.runtime.cwd)
    except Exception:  # noqa: BLE001 - no Hydra (pipeline.run called directly): the out dir
        pass
    return default_group(out, cwd=os.getcwd())


def finish_loggers(loggers: list, results: dict, samples: list[dict] | None = None,
                   student_dir: Path | None = None) -> None:
    """Log the run's final metrics/diagnostics and close every logger (one W&B run per job)."""
    for logger in loggers:
        if _is_wandb(logger):
            _finish_wandb(logger, results, samples, student_dir)
        else:
            logger.finalize("success")


def _is_wandb(logger) -> bool:
    try:
        from lightning.pytorch.loggers import WandbLogger
    except ImportError:  # pragma: no cover - lightning without wandb support
        return False
    return isinstance(logger, WandbLogger)


def _finish_wandb(logger, results: dict, samples, student_dir) -> None:
    from lightning.pytorch.utilities import rank_zero_only

    if rank_zero_only.rank != 0:
        return
    run = logger.experiment
    exit_code = 1
    try:
        _log_results(run, results, samples)
        if getattr(logger, "flexkd_log_model", _logger_cfg(results).get("log_model")):
            _log_student(run, results, student_dir)
        logger.finalize("success")
        exit_code = 0
    finally:
        run.finish(exit_code=exit_code)


def _logger_cfg(results: dict) -> dict:
    return ((results.get("config") or {}).get("logger") or {})


def _log_results(run, results: dict, samples) -> None:
    import wandb

    run.summary.update(summary_metrics(results))
    media: dict = {}
    for prefix, probe in probe_entries(results):
        spectrum = [float(x) for x in probe.get("spectrum") or [] if math.isfinite(float(x))]
        if not spectrum:
            continue
        media[f"{prefix}/spectrum_hist"] = wandb.Histogram(spectrum, num_bins=min(64, len(spectrum)))
        table = wandb.Table(columns=["rank", "score"],
                            data=[[rank, score] for rank, score in enumerate(spectrum, 1)])
        media[f"{prefix}/spectrum"] = wandb.plot.line(
            table, "rank", "score", title=f"{prefix}: importance score by rank")
    if samples:
        columns, rows = sample_rows(samples)
        media["eval/samples"] = wandb.Table(columns=columns, data=rows)
    if media:
        # Histograms/plots/tables live in history; W&B copies the last value into the summary.
        run.log(media)


def _log_student(run, results: dict, student_dir) -> None:
    import wandb

    if student_dir is None or not Path(student_dir).is_dir():
        log.warning("logger.log_model=true but no saved student dir (save_student=false?); "
                    "nothing uploaded")
        return
    meta = {k: results.get(k) for k in ("strategy", "pair", "task", "seed")}
    artifact = wandb.Artifact(artifact_name(meta), type="model",
                              metadata={**meta, "main_metric": results.get("main_metric"),
                                        "metrics": (results.get("metrics") or {}).get("student")})
    artifact.add_dir(str(student_dir))
    run.log_artifact(artifact, aliases=["latest", f"seed{meta['seed']}"])
