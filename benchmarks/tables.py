"""Paper-style tables from sweeps: mean +- std over seeds, and paired tests against a reference.

    python -m benchmarks.tables multirun/A [multirun/B ...] [--reference sft] [--metric accuracy]
                                [--split validation] [--wandb]

Reads every `results.json` below the given directories. There is one table per (pair, task,
metric); its rows are *variants*: a strategy plus every strategy setting that differs from that
strategy's defaults (`flexkd[score=random]`), plus every other config value that differs between
the runs of the table (`sft {optim.lr=0.0001}`), so an ablation or a budget change can never
land in another variant's row. Two runs of one variant and one seed are an error that names
both directories. Methods are compared on matched seeds (same seed = same student init and data
order), so the paired difference removes the seed-to-seed variance that dominates at CPU scale.
Writes `table.md`, `table.csv`, `summary.json` and the plots (benchmarks/plots.py) into the
first directory. `--split validation` ranks on the validation metrics and chooses, per strategy
swept over one numeric knob, its best value (benchmarks/validation_choice.py); `--wandb` (on by
itself for runs made with logger=wandb) logs it all to one W&B run (benchmarks/wandb_report.py).
Runs of `stage=removal` (results with `removal`) get one table each instead: the teacher's
metric per m with the top-m, bottom-m and random-m probe-ranked dims removed.
"""

from __future__ import annotations

import argparse
import copy
import csv
import io
import json
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from benchmarks.validation_choice import SPLITS, best_on_validation, choice_lines, collect, on_split
from flexkd.errors import UserError
from flexkd.storage import atomic_write_json, atomic_write_text

# Config keys that do not change what a run measures: where it caches or writes, how it logs.
NEUTRAL_KEYS = {"seed", "cache_dir", "resume", "debug", "output_dir", "save_student", "eval_model",
                "stage", "trainer.enable_progress_bar", "data.num_workers"}
# Whole sections: strategy.* is the variant's own part (its settings); the rest is bookkeeping.
NEUTRAL_ROOTS = {"strategy", "logger", "hydra", "checkpoint"}
UNSET = "unset"  # shown for a config key that one run of a table has and another lacks


class DuplicateRunError(UserError, ValueError):
    """Two results.json of one variant and one seed: the table would silently keep one of them."""


class UnknownReferenceError(UserError, ValueError):
    """`--reference` names no variant of any table."""


# ----------------------------------------------------------------------------- loading

def load_runs(dirs: list[Path]) -> list[dict]:
    """Every results.json below `dirs` (each file once, even if two dirs overlap); each run gets
    `_dir`, its directory, for error messages."""
    runs, seen = [], set()
    for d in dirs:
        for path in sorted(Path(d).rglob("results.json")):
            if path.resolve() in seen:
                continue
            seen.add(path.resolve())
            try:
                run = json.loads(path.read_text())
            except (OSError, ValueError) as e:
                print(f"skipping unreadable {path}: {e}", file=sys.stderr)
                continue
            run["_dir"] = str(path.parent)
            runs.append(as_trained_job(run))
    return runs


# What a scoring reads: a re-scoring's values of these replace its training job's, so that a
# different protocol, test set, prompt template or precision keeps a row of its own.
SCORING_SETTINGS = ("eval", "task", "data.eval_batch_size", "trainer.precision")


def as_trained_job(run: dict) -> dict:
    """A `stage=eval` run of a student that a training job saved (`eval_model=<job>/student`,
    same task) is that job re-scored: it takes the job's identity (pair, strategy, seed and
    config: the re-scoring's own seed is 0 whichever seed trained the student) with the
    re-scoring's scoring settings (`SCORING_SETTINGS`) and metrics. It lands in the job's
    variant row, and apart from the job's own scores wherever those settings differ (greedy vs
    sampled; another test subset or template)."""
    if run.get("stage") != "eval" or not run.get("model"):
        return run
    job = Path(run["model"]).parent / "results.json"
    if not job.is_file():
        return run
    trained = json.loads(job.read_text())
    if trained.get("stage") == "eval" or trained.get("task") != run.get("task"):
        return run
    config = copy.deepcopy(trained.get("config", {}))
    for dotted in SCORING_SETTINGS:
        *parents, leaf = dotted.split(".")
        source, target = run.get("config", {}), config
        for key in parents:
            source, target = (source or {}).get(key) or {}, target.setdefault(key, {})
        if leaf in source:
            target[leaf] = source[leaf]
        else:
            target.pop(leaf, None)
    return {**trained, "config": config, "rescored_from": str(job.parent),
            **{key: run[key] for key in ("metrics", "main_metric", "eval_settings", "samples",
                                         "_dir") if key in run}}


def metric_of(run: dict, metric: str | None, who: str = "student") -> float | None:
    name = metric or run.get("main_metric")
    value = run.get("metrics", {}).get(who, {}).get(name)
    return float(value) if isinstance(value, (int, float)) else None


def flatten(obj: dict, prefix: str = "") -> dict:
    """{"optim": {"lr": 1e-4}} -> {"optim.lr": 1e-4}; lists and empty dicts stay values."""
    out = {}
    for key, value in obj.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def format_value(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def output_name(name: str, split: str) -> str:
    """`table.md` for the test split, `table.validation.md` for another: choosing on validation
    and then reporting on test writes two sets of files, neither overwriting the other."""
    if split == "test":
        return name
    stem, dot, ext = name.rpartition(".")
    return f"{stem}.{split}{dot}{ext}"


def settings_label(strategy: str, settings: dict) -> str:
    if not settings:
        return strategy
    return f"{strategy}[{','.join(f'{k}={format_value(v)}' for k, v in sorted(settings.items()))}]"


def _neutral(key: str) -> bool:
    return key in NEUTRAL_KEYS or key.split(".")[0] in NEUTRAL_ROOTS


# ----------------------------------------------------------------------------- variants

def strategy_settings(runs: list[dict]) -> list[dict]:
    """Per run, the strategy settings that make its variant.

    Runs that record `variant` (settings differing from the strategy's defaults) use it. Older
    runs do not: among them, strategy.* values that differ between runs of one strategy become
    their settings, so an old ablation still gets its own row instead of merging.
    """
    settings: list[dict | None] = [
        dict(r["variant"].get("settings") or {}) if isinstance(r.get("variant"), dict) else None
        for r in runs]
    old = defaultdict(list)
    for i, r in enumerate(runs):
        if settings[i] is None:
            old[r["strategy"]].append(i)
    for idx in old.values():
        for i, varying in _varying_strategy_values(runs, idx).items():
            settings[i] = varying
    return _split_by_configured_values(runs, settings)


def _split_by_configured_values(runs: list[dict], settings: list[dict]) -> list[dict]:
    """Runs that share a strategy and settings but were configured differently get the differing
    strategy.* values as settings too. A recorded variant is relative to the defaults of its day:
    after a default changes (beta 0.5 -> 0.1), an old `flexkd` run and a new one are different."""
    groups = defaultdict(list)
    for i, (r, s) in enumerate(zip(runs, settings, strict=True)):
        if isinstance((r.get("config") or {}).get("strategy"), dict):
            groups[(r["strategy"], json.dumps(s, sort_keys=True, default=str))].append(i)
    out = [dict(s) for s in settings]
    for idx in groups.values():
        for i, varying in _varying_strategy_values(runs, idx).items():
            out[i].update({k: v for k, v in varying.items() if k not in settings[i]})
    return out


def _varying_strategy_values(runs: list[dict], idx: list[int]) -> dict[int, dict]:
    """For the runs at `idx`: each one's strategy.* values (name aside) at the keys where they
    do not all agree (UNSET where a run lacks the key)."""
    flat = {i: {k: v for k, v in flatten((runs[i].get("config") or {}).get("strategy") or {}).items()
                if k != "name"} for i in idx}
    keys = set().union(*(f.keys() for f in flat.values()))
    varying = sorted(k for k in keys
                     if len({json.dumps(flat[i].get(k, UNSET), default=str) for i in idx}) > 1)
    return {i: {k: flat[i].get(k, UNSET) for k in varying} for i in idx}


def config_differences(runs: list[dict]) -> list[dict]:
    """Per run, the non-strategy config values that differ between the given runs (one table).

    Runs without a recorded config cannot be compared and get none. A key that merely equals the
    run's seed everywhere (a seed-derived value) is not a difference between variants.
    """
    flat = {i: {k: v for k, v in flatten(r["config"]).items() if not _neutral(k)}
            for i, r in enumerate(runs) if isinstance(r.get("config"), dict)}
    keys = set().union(*(f.keys() for f in flat.values())) if flat else set()
    varying = []
    for key in sorted(keys):
        values = {i: f.get(key, UNSET) for i, f in flat.items()}
        if len({json.dumps(v, sort_keys=True) for v in values.values()}) < 2:
            continue
        if all(v == runs[i].get("seed") for i, v in values.items()):
            continue
        varying.append(key)
    return [{k: flat[i].get(k, UNSET) for k in varying} if i in flat else {} for i in range(len(runs))]


def variant_label(strategy_part: str, config: dict) -> str:
    if not config:
        return strategy_part
    return f"{strategy_part} {{{', '.join(f'{k}={format_value(v)}' for k, v in sorted(config.items()))}}}"


# ----------------------------------------------------------------------------- statistics

def mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def mean_ci(values: list[float], level: float = 0.95) -> list[float]:
    """t-interval of the mean over seeds; [nan, nan] for fewer than two seeds."""
    if len(values) < 2:
        return [math.nan, math.nan]
    from scipy import stats

    mean, sd = statistics.fmean(values), statistics.stdev(values)
    half = stats.t.ppf(0.5 + level / 2, len(values) - 1) * sd / math.sqrt(len(values))
    return [mean - half, mean + half]


def paired_test(a: dict[int, float], b: dict[int, float]) -> dict:
    """a - b on the seeds both have: mean difference, its 95% CI and the paired t-test p."""
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    out = {"seeds": seeds, "n": len(diffs), "mean_diff": statistics.fmean(diffs) if diffs else math.nan,
           "ci95": [math.nan, math.nan], "p_value": math.nan}
    if len(diffs) >= 2:
        mean = out["mean_diff"]
        if statistics.stdev(diffs) <= 1e-12 * max(1.0, abs(mean)):
            # Identical differences on every seed: the t statistic is undefined (scipy warns and
            # returns nan), but the difference is exactly known.
            out["ci95"], out["p_value"] = [mean, mean], 1.0 if mean == 0 else 0.0
            return out
        from scipy import stats

        test = stats.ttest_rel([a[s] for s in seeds], [b[s] for s in seeds])
        ci = test.confidence_interval(0.95)
        out["ci95"], out["p_value"] = [float(ci.low), float(ci.high)], float(test.pvalue)
    return out


# ----------------------------------------------------------------------------- summary

def _probe_of(run: dict) -> dict | None:
    probes = (run.get("probe") or {}).get("probes") or []
    if not probes or not probes[0].get("spectrum"):
        return None
    first = probes[0]
    return {"seed": run.get("seed"), "spectrum": first["spectrum"], "k": first.get("k"),
            "effective_dims": first.get("effective_dims") or {}}


def _row(key: tuple, runs: list[dict], metric: str | None, label: str, strategy_part: str,
         settings: dict, config: dict, coords: dict) -> dict:
    by_seed = {int(r["seed"]): r for r in runs}
    scores = {s: v for s, r in sorted(by_seed.items()) if (v := metric_of(r, metric)) is not None}
    teacher = [v for r in runs if (v := metric_of(r, metric, "teacher")) is not None]
    timings = defaultdict(list)
    for r in runs:
        for stage, sec in r.get("timings", {}).items():
            timings[stage].append(sec)
    mean, std = mean_std(list(scores.values()))
    first = by_seed[min(by_seed)]
    return {
        "pair": key[0], "task": key[1], "metric": key[2], "variant": label,
        "strategy": first["strategy"], "strategy_label": strategy_part, "settings": settings,
        "config": config, "coords": coords,
        "n_seeds": len(scores), "mean": mean, "std": std, "ci95": mean_ci(list(scores.values())),
        "scores": scores,
        "teacher": statistics.fmean(teacher) if teacher else math.nan,
        "extra_params": first.get("params", {}).get("strategy_extra_trainable"),
        "seconds": {k: statistics.fmean(v) for k, v in timings.items()},
        "dirs": [by_seed[s].get("_dir") for s in sorted(by_seed)],
        "probe": _probe_of(first),
        "width_ratio": _common(runs, "width_ratio"),
        "curves": _validation_curves(by_seed),
    }


def _validation_curves(by_seed: dict[int, dict]) -> dict[int, list[list]]:
    """{seed: [[step, validation rougeL], ...]} of the runs that scored checkpoints during
    training (eval.select_checkpoint=best_val_rougeL): the learning curve of each seed."""
    out = {}
    for seed, run in sorted(by_seed.items()):
        history = (run.get("checkpoint_selection") or {}).get("history") or []
        if history:
            out[seed] = [[int(h["step"]), float(h["rougeL"])] for h in history]
    return out


def _common(runs: list[dict], key: str):
    """results[key] when every run records the same value, else None."""
    values = {json.dumps(r.get(key)) for r in runs}
    return runs[0].get(key) if len(values) == 1 else None


def width_ratio_series(summary: dict) -> dict[tuple[str, str], list[dict]]:
    """Across tables (one per pair), each variant's paired difference to its table's reference
    vs the pair's width ratio d_T/d_S (results["width_ratio"]), per (task, metric):
    {(task, metric): [{"label": variant, "points": [(ratio, vs)], "reference": ...}]}, for
    tasks whose tables cover >= 2 ratios. Variants match by label across pairs."""
    by_task: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    references: dict[tuple, set] = defaultdict(set)
    for table in summary["tables"]:
        for row in table["rows"]:
            if row.get("vs") and isinstance(row.get("width_ratio"), (int, float)):
                by_task[(table["task"], table["metric"])][row["variant"]].append(
                    (float(row["width_ratio"]), row["vs"]))
                references[(table["task"], table["metric"])].add(row["vs"]["reference"])
    out = {}
    for key, variants in sorted(by_task.items()):
        if len({x for pts in variants.values() for x, _ in pts}) < 2:
            continue
        out[key] = [{"label": label, "points": sorted(pts, key=lambda p: p[0]),
                     "reference": ", ".join(sorted(references[key]))}
                    for label, pts in sorted(variants.items())]
    return out


def _coords(runs: list[dict], settings: list[dict], configs: list[dict]) -> list[dict]:
    """Per run, every dimension a variant can differ in: its settings, filled in from its own
    config where another run of its strategy set them (a default-beta run sits on a beta sweep
    at its configured beta), and its config differences."""
    keys_by_strategy = defaultdict(set)
    for r, s in zip(runs, settings, strict=True):
        keys_by_strategy[r["strategy"]].update(s)
    out = []
    for r, s, c in zip(runs, settings, configs, strict=True):
        own = flatten((r.get("config") or {}).get("strategy") or {})
        coords = {k: s[k] if k in s else own[k] for k in keys_by_strategy[r["strategy"]]
                  if k in s or k in own}
        out.append({**coords, **c})
    return out


def find_variant(rows: list[dict], name: str) -> dict | None:
    """The row labelled `name`, or else the one row whose strategy part is `name`."""
    exact = [r for r in rows if r["variant"] == name]
    if exact:
        return exact[0]
    loose = [r for r in rows if r["strategy_label"] == name]
    return loose[0] if len(loose) == 1 else None


def without_nan(value):
    """A copy with NaN (one seed: no std, no interval) as None, so the file is strict JSON
    (json.dumps writes NaN, which JSON.parse, jq and most readers reject)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: without_nan(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [without_nan(v) for v in value]
    return value


def summarise(runs: list[dict], metric: str | None = None, reference: str | None = None) -> dict:
    """Tables per (pair, task, metric) with one row per variant; see the module docstring."""
    by_table: dict[tuple, list[dict]] = defaultdict(list)
    for run in runs:
        by_table[(run["pair"], run["task"], metric or run.get("main_metric"))].append(run)
    tables = []
    for key, table_runs in sorted(by_table.items(), key=lambda kv: tuple(map(str, kv[0]))):
        settings = strategy_settings(table_runs)
        configs = config_differences(table_runs)
        coords = _coords(table_runs, settings, configs)
        variants: dict[str, dict] = {}
        for run, s, c, xy in zip(table_runs, settings, configs, coords, strict=True):
            recorded = run.get("variant") if isinstance(run.get("variant"), dict) else {}
            strategy_part = (recorded["label"] if recorded.get("label") and s == recorded.get("settings", {})
                             else settings_label(run["strategy"], s))
            label = variant_label(strategy_part, c)
            identity = json.dumps([run["strategy"], s, c], sort_keys=True, default=str)
            v = variants.setdefault(identity, {"label": label, "strategy_part": strategy_part,
                                               "settings": s, "config": c, "coords": xy,
                                               "by_seed": {}})
            seed = int(run["seed"])
            if seed in v["by_seed"]:
                raise DuplicateRunError(
                    f"two runs of variant {label!r} with seed {seed} in {key[0]}/{key[1]}: "
                    f"{v['by_seed'][seed]['_dir']} and {run.get('_dir')}; remove one of them or "
                    "pass only one of their sweep directories")
            v["by_seed"][seed] = run
        rows = [_row(key, list(v["by_seed"].values()), metric, v["label"], v["strategy_part"],
                     v["settings"], v["config"], v["coords"])
                for v in sorted(variants.values(), key=lambda v: v["label"])]
        tables.append(compare(rows, key, reference, sorted(set().union(*map(set, configs)))))
    if reference is not None and not any(t["reference"] for t in tables):
        names = sorted({r["variant"] for t in tables for r in t["rows"]})
        raise UnknownReferenceError(f"--reference {reference!r} is no variant of these runs; "
                              f"choose one of {names}")
    return {"metric": metric, "reference": reference, "tables": tables}


def reference_of(rows: list[dict], name: str, row: dict) -> dict | None:
    """`row`'s reference: the row labelled `name`; else the row of strategy part `name` run with
    `row`'s own config differences (a sweep over a setting such as data.train_fraction compares
    each value with the reference at that value); else the one row of strategy part `name`."""
    exact = [r for r in rows if r["variant"] == name]
    if exact:
        return exact[0]
    loose = [r for r in rows if r["strategy_label"] == name]
    matched = [r for r in loose if r["config"] == row["config"]]
    return matched[0] if len(matched) == 1 else loose[0] if len(loose) == 1 else None


def compare(rows: list[dict], key: tuple, reference: str | None, varying: list[str]) -> dict:
    """Paired differences of every row to its reference row (`reference_of`), and whether each
    lies within the reference's seed std."""
    name = reference if reference is not None else "sft"
    used: dict[str, dict] = {}
    for row in rows:
        row["vs"] = None
        ref = reference_of(rows, name, row)
        if ref is not None and ref is not row:
            used[ref["variant"]] = ref
            vs = {"reference": ref["variant"], **paired_test(row["scores"], ref["scores"])}
            spread = ref["std"]
            vs["within_seed_std"] = (None if math.isnan(spread) or math.isnan(vs["mean_diff"])
                                     else abs(vs["mean_diff"]) <= spread)
            row["vs"] = vs
    ref = next(iter(used.values())) if len(used) == 1 else None if used else find_variant(rows, name)
    label = ref["variant"] if ref else f"{name} (matched on {', '.join(varying)})" if used else None
    flags = [r["vs"]["within_seed_std"] for r in rows if r["vs"]]
    all_within = bool(flags) and all(f is True for f in flags)
    spread = f" ({_f(ref['std'])})" if ref else ""
    note = (f"All differences to {label} lie within one seed std of it{spread}: no variant is "
            "distinguishable from it at this budget." if all_within else None)
    return {"pair": key[0], "task": key[1], "metric": key[2],
            "reference": label, "varying_config": varying,
            "all_within_seed_std": all_within, "note": note, "rows": rows}


# ----------------------------------------------------------------------------- output

def _f(x, digits=4) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def markdown(summary: dict) -> str:
    blocks = []
    for t in summary["tables"]:
        ref = t["reference"]
        split = f" on {summary['split']}" if summary.get("split", "test") != "test" else ""
        head = [f"### {t['pair']} / {t['task']}: {t['metric']}{split}"
                + (f" (reference: {ref})" if ref else "")]
        if t["varying_config"]:
            head.append(f"\nConfig that differs between runs: {', '.join(t['varying_config'])}")
        lines = ["", "| variant | student (mean ± std) | 95% CI | seeds | teacher | "
                 f"Δ vs {ref or 'ref'} [95% CI] | p (paired t) | within ref std | extra params | "
                 "train s |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in t["rows"]:
            vs = r["vs"]
            delta = f"{_f(vs['mean_diff'])} [{_f(vs['ci95'][0])}, {_f(vs['ci95'][1])}]" if vs else "-"
            within = "-" if not vs or vs["within_seed_std"] is None else (
                "yes" if vs["within_seed_std"] else "no")
            lines.append(
                f"| {r['variant']} | {_f(r['mean'])} ± {_f(r['std'])} | "
                f"[{_f(r['ci95'][0])}, {_f(r['ci95'][1])}] | {r['n_seeds']} | {_f(r['teacher'])} | "
                f"{delta} | {_f(vs['p_value'], 3) if vs else '-'} | {within} | {r['extra_params']} | "
                f"{_f(r['seconds'].get('distill'), 1)} |")
        if t["note"]:
            lines += ["", t["note"]]
        if t.get("best_on_validation"):
            lines += ["", *choice_lines(t)]
        blocks.append("\n".join(head + lines))
    return "\n\n".join(blocks)


def removal_summary(runs: list[dict]) -> list[dict]:
    """One entry per stage=removal run: its curves (results["removal"]) and a label that names
    what the curves depend on; two runs with one label are an error naming both."""
    entries, dirs = [], {}
    for r in sorted(runs, key=lambda r: (r["pair"], r["task"], r.get("_dir", ""))):
        rem = r["removal"]
        label = (f"{rem['selection']}, score={rem['score']}, fill={rem['fill']}, layer {rem['layer']}, "
                 f"seed {r['seed']}")
        key = (r["pair"], r["task"], label)
        if key in dirs:
            raise DuplicateRunError(f"two removal runs of {label!r} in {r['pair']}/{r['task']}: "
                                    f"{dirs[key]} and {r.get('_dir')}; pass only one of their directories")
        dirs[key] = r.get("_dir")
        entries.append({"pair": r["pair"], "task": r["task"], "metric": r.get("main_metric"),
                        "label": label, "seed": r["seed"], "dir": r.get("_dir"), **rem})
    return entries


def removal_markdown(entries: list[dict]) -> str:
    blocks = []
    for e in entries:
        lines = [f"### {e['pair']} / {e['task']}: teacher {e['metric']} with probe-ranked dims removed "
                 f"({e['label']}; d={e['d']})", "",
                 f"Unablated teacher: {_f(e['baseline'])}; random: {len(e['random'][0])} draws.", "",
                 "| m | top-m removed | bottom-m removed | random-m mean ± std |", "|---|---|---|---|"]
        for i, m in enumerate(e["m"]):
            lines.append(f"| {m} | {_f(e['top'][i])} | {_f(e['bottom'][i])} | "
                         f"{_f(e['random_mean'][i])} ± {_f(e['random_std'][i])} |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def mean_curve(row: dict) -> dict[int, float]:
    """{step: mean validation rougeL over seeds} at the steps every seed of `row` reached."""
    curves = [dict(map(tuple, points)) for points in row["curves"].values()]
    return {s: statistics.fmean(c[s] for c in curves)
            for s in sorted(set.intersection(*(set(c) for c in curves)))}


def curves_markdown(summary: dict) -> str:
    """Per table whose runs scored validation ROUGE-L while training: the mean over seeds at each
    step every seed of a variant reached (the learning-curve plot's numbers)."""
    blocks = []
    for t in summary["tables"]:
        rows = [r for r in t["rows"] if r.get("curves")]
        if not rows:
            continue
        means = {r["variant"]: mean_curve(r) for r in rows}
        steps = sorted(set().union(*means.values()))
        lines = [f"### {t['pair']} / {t['task']}: validation rougeL (greedy) while training, "
                 "mean over seeds", "",
                 "| variant | " + " | ".join(f"step {s}" for s in steps) + " |",
                 "|---|" + "---|" * len(steps)]
        lines += [f"| {variant} | " + " | ".join(_f(m.get(s, math.nan), 2) for s in steps) + " |"
                  for variant, m in means.items()]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def to_csv(summary: dict) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["pair", "task", "metric", "variant", "strategy", "settings", "config", "mean",
                     "std", "n_seeds", "ci95_low", "ci95_high", "teacher", "reference", "mean_diff",
                     "diff_ci95_low", "diff_ci95_high", "p_value", "within_seed_std", "extra_params"])
    for t in summary["tables"]:
        for r in t["rows"]:
            vs = r["vs"] or {}
            ci = vs.get("ci95", [None, None])
            writer.writerow([r["pair"], r["task"], r["metric"], r["variant"], r["strategy"],
                             json.dumps(r["settings"], sort_keys=True),
                             json.dumps(r["config"], sort_keys=True), r["mean"], r["std"],
                             r["n_seeds"], r["ci95"][0], r["ci95"][1], r["teacher"],
                             vs.get("reference"), vs.get("mean_diff"), ci[0], ci[1],
                             vs.get("p_value"), vs.get("within_seed_std"), r["extra_params"]])
    return buf.getvalue()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dirs", nargs="+", type=Path, help="sweep or run directories")
    parser.add_argument("--metric", default=None, help="student metric (default: each run's main)")
    parser.add_argument("--reference", default=None,
                        help="variant label to compare against, e.g. sft or 'flexkd[score=random]' "
                             "(default: sft where a table has it)")
    parser.add_argument("--no-plots", action="store_true", help="write only the table files")
    parser.add_argument("--split", choices=SPLITS, default="test",
                        help="compare on the test metrics (default) or on the validation metrics, "
                             "choosing each swept knob's value (best_on_validation in summary.json)")
    parser.add_argument("--wandb", action="store_true",
                        help="log table, summary numbers and plots to one W&B run in the sweep's "
                             "group (default: when the runs were made with logger=wandb)")
    args = parser.parse_args(argv)
    all_runs = load_runs(args.dirs)
    if not all_runs:
        parser.error(f"no results.json found under {', '.join(map(str, args.dirs))}")
    removal_runs = [r for r in all_runs if r.get("removal")]
    train_runs = [r for r in all_runs if not r.get("removal")]
    try:
        runs = on_split(train_runs, args.split, args.metric) if train_runs else []
        summary = (summarise(runs, args.metric, args.reference) if runs else
                   {"metric": args.metric, "reference": args.reference, "tables": []})
        if removal_runs:
            summary["removal"] = removal_summary(removal_runs)
    except UserError as e:
        raise SystemExit(f"error: {e}") from None
    summary["split"] = args.split
    if args.split == "validation":
        for t in summary["tables"]:
            t["best_on_validation"] = best_on_validation(t)
        summary["best_on_validation"] = collect(summary["tables"])
    table = "\n\n".join(t for t in (markdown(summary), curves_markdown(summary),
                                    removal_markdown(summary.get("removal", []))) if t)
    out = args.dirs[0]
    table_name = output_name("table.md", args.split)
    atomic_write_text(out / table_name, table + "\n")
    atomic_write_text(out / output_name("table.csv", args.split), to_csv(summary))
    if not args.no_plots:
        from benchmarks.plots import plot_files

        summary["plots"] = [p.name for p in plot_files(summary, out)]
    summary_name = output_name("summary.json", args.split)
    atomic_write_json(out / summary_name, without_nan(summary))
    print(table)
    plots = f" and {len(summary['plots'])} plot files" if summary.get("plots") else ""
    print(f"\n{len(all_runs)} runs; table written to {out / table_name} "
          f"(csv, {summary_name}{plots} beside it)")
    from benchmarks.wandb_report import log_report, made_with_wandb

    if args.wandb or made_with_wandb(all_runs):
        log_report(summary, out, all_runs)
    return summary


if __name__ == "__main__":
    main()
