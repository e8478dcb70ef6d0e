"""A sweep's tables and plots as one W&B run (benchmarks.tables --wandb).

The jobs of a sweep made with logger=wandb log one W&B run each, grouped by their sweep
(flexkd.loggers). The report joins that group as one more run (job type `tables`): the table
as a wandb.Table (and table.md as text), the summary numbers (every row's mean, std, CI and
paired difference; the knob values chosen on validation) and every plot file (PNG as
wandb.Image, SVG as HTML). Project, entity, group and mode come from the runs' logger config,
resolved as flexkd.loggers does for the jobs: offline without credentials, so no API key is
needed (`wandb sync <dir>` uploads it later).
"""

from __future__ import annotations

import html
import logging
import math
import os
from pathlib import Path

from omegaconf import OmegaConf

from benchmarks.tables import without_nan
from flexkd import loggers

log = logging.getLogger(__name__)

TABLE_COLUMNS = ["pair", "task", "metric", "split", "variant", "strategy", "mean", "std", "ci95_low",
                 "ci95_high", "n_seeds", "teacher", "reference", "mean_diff", "p_value"]


def logger_config(runs: list[dict]) -> dict:
    """The logger config of the first run made with logger=wandb, else {} (W&B defaults)."""
    for run in runs:
        cfg = (run.get("config") or {}).get("logger") or {}
        if cfg.get("name") == "wandb":
            return cfg
    return {}


def made_with_wandb(runs: list[dict]) -> bool:
    return bool(logger_config(runs))


def job_group(run: dict) -> str | None:
    """The W&B group the job of `run` logged to (or would have): logger.group, else what
    flexkd.loggers derived from the job's Hydra run (the sweep dir for a multirun job, relative
    to its launch cwd), read back from <job>/.hydra/hydra.yaml; None without either."""
    explicit = ((run.get("config") or {}).get("logger") or {}).get("group")
    if explicit:
        return str(explicit)
    job_dir = Path(run["_dir"]).resolve()
    hydra_yaml = job_dir / ".hydra" / "hydra.yaml"
    if not hydra_yaml.is_file():
        return None
    hc = OmegaConf.load(hydra_yaml).hydra
    mode, runtime = str(hc.get("mode")), hc.get("runtime") or {}
    out = Path(runtime.get("output_dir") or job_dir)
    # sweep.dir may hold an interpolation only the job could resolve (its command id); the
    # job's dir is <sweep dir>/<job num> (conf/config.yaml's hydra.sweep.subdir).
    return loggers.default_group(out, hydra_mode=mode, sweep_dir=str(out.parent), cwd=runtime.get("cwd"))


def report_numbers(summary: dict) -> dict:
    """Flat summary keys: <pair>/<task>/<metric>/<variant>/{mean,std,...} and
    best_on_validation/<strategy>/{value,mean,ci95_low,ci95_high}."""
    numbers: dict = {"split": summary.get("split", "test")}
    for t in summary["tables"]:
        for r in t["rows"]:
            vs = r.get("vs") or {}
            values = {"mean": r["mean"], "std": r["std"], "ci95_low": r["ci95"][0],
                      "ci95_high": r["ci95"][1], "n_seeds": r["n_seeds"],
                      "mean_diff": vs.get("mean_diff"), "p_value": vs.get("p_value")}
            prefix = f"{t['pair']}/{t['task']}/{t['metric']}/{r['variant']}"
            numbers.update({f"{prefix}/{k}": v for k, v in values.items() if _finite(v)})
    for strategy, c in (summary.get("best_on_validation") or {}).items():
        values = {"value": c["value"], "mean": c["mean"], "ci95_low": c["ci"][0],
                  "ci95_high": c["ci"][1]}
        numbers.update({f"best_on_validation/{strategy}/{k}": v for k, v in values.items()
                        if _finite(v)})
        numbers[f"best_on_validation/{strategy}/knob"] = c["knob"]
    return numbers


def table_rows(summary: dict) -> list[list]:
    split = summary.get("split", "test")
    rows = []
    for t in summary["tables"]:
        for r in t["rows"]:
            vs = r.get("vs") or {}
            rows.append([t["pair"], t["task"], t["metric"], split, r["variant"], r["strategy"],
                         r["mean"], r["std"], r["ci95"][0], r["ci95"][1], r["n_seeds"], r["teacher"],
                         vs.get("reference"), vs.get("mean_diff"), vs.get("p_value")])
    # NaN (one seed: no std or CI) is no JSON value; W&B tables take None as an empty cell.
    return without_nan(rows)


def plot_key(filename: str) -> str:
    """p_t_accuracy.sweep-beta.png -> plots/p_t_accuracy/sweep-beta (SVG: plots_svg/...)."""
    stem, _, fmt = filename.rpartition(".")
    return f"{'plots' if fmt == 'png' else 'plots_' + fmt}/{stem.replace('.', '/')}"


def log_report(summary: dict, out_dir: str | Path, runs: list[dict]) -> Path | None:
    """Log `summary` (benchmarks.tables), out_dir/table.md and the plots named in
    summary["plots"] to one W&B run in the group of runs[0]'s job (runs not made by Hydra:
    out_dir, relative to the cwd); returns the run's dir (None when W&B is disabled)."""
    import wandb

    from benchmarks.tables import output_name

    out_dir = Path(out_dir)
    cfg = logger_config(runs)
    mode = loggers.resolve_mode(cfg.get("mode"))
    if mode == "disabled":
        print("W&B is disabled (logger.mode or $WANDB_MODE): no report run logged", flush=True)
        return None
    group = job_group(runs[0]) or loggers.group_name(out_dir.resolve(), os.getcwd())
    if wandb.run is not None:
        log.warning("finishing a W&B run left open: %s", wandb.run.name)
        wandb.finish(exit_code=1)
    split = summary.get("split", "test")
    tags = list(dict.fromkeys(["tables", f"split:{split}", *map(str, cfg.get("tags") or [])]))
    run = wandb.init(project=cfg.get("project") or "flexkd", entity=cfg.get("entity"), group=group,
                     job_type="tables", name=f"tables-{split}", tags=tags, mode=mode, dir=str(out_dir),
                     config={"dirs": sorted({str(Path(r["_dir"]).parent) for r in runs}),
                             "split": split, "metric": summary.get("metric"),
                             "reference": summary.get("reference"), "runs": len(runs)})
    exit_code = 1
    try:
        media = {"table": wandb.Table(columns=TABLE_COLUMNS, data=table_rows(summary))}
        table_md = out_dir / output_name("table.md", split)
        if table_md.is_file():
            media["table_md"] = wandb.Html(f"<pre>{html.escape(table_md.read_text())}</pre>",
                                           inject=False, data_is_not_path=True)
        for name in summary.get("plots") or []:
            path = out_dir / name
            if name.endswith(".png"):
                media[plot_key(name)] = wandb.Image(str(path), caption=name)
            elif name.endswith(".svg"):
                media[plot_key(name)] = wandb.Html(path.read_text(), inject=False,
                                                   data_is_not_path=True)
        run.log(media)
        run.summary.update(report_numbers(summary))
        exit_code = 0
    finally:
        run_dir = Path(run.settings.sync_dir).resolve()
        run.finish(exit_code=exit_code)
    if mode == "offline":
        print(f"W&B report run {run.id} (group {group}) is offline at {run_dir}; upload it with: "
              f"wandb sync {run_dir}", flush=True)
    else:
        print(f"W&B report run {run.id} logged to group {group}", flush=True)
    return run_dir


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
