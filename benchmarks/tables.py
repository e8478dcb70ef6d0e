"""Paper-style tables from a sweep: mean +- std over seeds, and paired tests against a reference.

    python -m benchmarks.tables multirun/2026-11-28/10-00-00 [--reference sft] [--metric accuracy]

Reads every `results.json` below the given directories, groups runs by (pair, task, strategy),
and writes `table.md`, `table.csv` and `summary.json` next to the first directory. Methods
are compared on matched seeds (same seed = same student init and data order), so the paired
difference removes the seed-to-seed variance that dominates at CPU scale.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from flexkd.storage import atomic_write_json, atomic_write_text


def load_runs(dirs: list[Path]) -> list[dict]:
    runs = []
    for d in dirs:
        for path in sorted(Path(d).rglob("results.json")):
            try:
                runs.append(json.loads(path.read_text()))
            except (OSError, ValueError) as e:
                print(f"skipping unreadable {path}: {e}", file=sys.stderr)
    return runs


def metric_of(run: dict, metric: str | None, who: str = "student") -> float | None:
    name = metric or run.get("main_metric")
    value = run.get("metrics", {}).get(who, {}).get(name)
    return float(value) if isinstance(value, (int, float)) else None


def mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def paired_test(a: dict[int, float], b: dict[int, float]) -> dict:
    """a - b on the seeds both have: mean difference, its 95% CI and the paired t-test p."""
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    out = {"seeds": seeds, "n": len(diffs), "mean_diff": statistics.fmean(diffs) if diffs else math.nan,
           "ci95": [math.nan, math.nan], "p_value": math.nan}
    if len(diffs) >= 2:
        from scipy import stats

        sd = statistics.stdev(diffs)
        half = stats.t.ppf(0.975, len(diffs) - 1) * sd / math.sqrt(len(diffs))
        out["ci95"] = [out["mean_diff"] - half, out["mean_diff"] + half]
        out["p_value"] = float(stats.ttest_rel(
            [a[s] for s in seeds], [b[s] for s in seeds]).pvalue) if sd > 0 else (
            1.0 if out["mean_diff"] == 0 else 0.0)
    return out


def summarise(runs: list[dict], metric: str | None = None, reference: str | None = None) -> dict:
    groups: dict[tuple, dict[int, dict]] = defaultdict(dict)
    for run in runs:
        groups[(run["pair"], run["task"], run["strategy"])][int(run["seed"])] = run
    rows = []
    for (pair, task, strategy), by_seed in sorted(groups.items()):
        scores = {s: v for s, r in by_seed.items() if (v := metric_of(r, metric)) is not None}
        teacher = [v for r in by_seed.values() if (v := metric_of(r, metric, "teacher")) is not None]
        timings = defaultdict(list)
        for r in by_seed.values():
            for stage, sec in r.get("timings", {}).items():
                timings[stage].append(sec)
        mean, std = mean_std(list(scores.values()))
        any_run = next(iter(by_seed.values()))
        rows.append({
            "pair": pair, "task": task, "strategy": strategy,
            "metric": metric or any_run.get("main_metric"),
            "n_seeds": len(scores), "mean": mean, "std": std, "scores": scores,
            "teacher": statistics.fmean(teacher) if teacher else math.nan,
            "extra_params": any_run.get("params", {}).get("strategy_extra_trainable"),
            "seconds": {k: statistics.fmean(v) for k, v in timings.items()},
        })
    for row in rows:
        same = [r for r in rows if (r["pair"], r["task"]) == (row["pair"], row["task"])]
        ref_name = reference if any(r["strategy"] == reference for r in same) else (
            "sft" if any(r["strategy"] == "sft" for r in same) else None)
        ref = next((r for r in same if r["strategy"] == ref_name), None)
        if ref is not None and ref is not row:
            row["vs"] = {"reference": ref_name, **paired_test(row["scores"], ref["scores"])}
    return {"metric": metric, "reference": reference, "rows": rows}


def _f(x, digits=4) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def markdown(summary: dict) -> str:
    lines = ["| pair | task | strategy | metric | student (mean ± std) | seeds | teacher | "
             "Δ vs ref [95% CI] | p (paired t) | extra params | train s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        vs = r.get("vs")
        delta = (f"{_f(vs['mean_diff'])} [{_f(vs['ci95'][0])}, {_f(vs['ci95'][1])}] vs "
                 f"{vs['reference']}" if vs else "-")
        lines.append(
            f"| {r['pair']} | {r['task']} | {r['strategy']} | {r['metric']} | "
            f"{_f(r['mean'])} ± {_f(r['std'])} | {r['n_seeds']} | {_f(r['teacher'])} | {delta} | "
            f"{_f(vs['p_value'], 3) if vs else '-'} | {r['extra_params']} | "
            f"{_f(r['seconds'].get('distill'), 1)} |")
    return "\n".join(lines)


def to_csv(summary: dict) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["pair", "task", "strategy", "metric", "mean", "std", "n_seeds", "teacher",
                     "reference", "mean_diff", "ci95_low", "ci95_high", "p_value", "extra_params"])
    for r in summary["rows"]:
        vs = r.get("vs") or {}
        ci = vs.get("ci95", [None, None])
        writer.writerow([r["pair"], r["task"], r["strategy"], r["metric"], r["mean"], r["std"],
                         r["n_seeds"], r["teacher"], vs.get("reference"), vs.get("mean_diff"),
                         ci[0], ci[1], vs.get("p_value"), r["extra_params"]])
    return buf.getvalue()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dirs", nargs="+", type=Path, help="sweep or run directories")
    parser.add_argument("--metric", default=None, help="student metric (default: each run's main)")
    parser.add_argument("--reference", default="sft", help="strategy to compare against")
    args = parser.parse_args(argv)
    runs = load_runs(args.dirs)
    if not runs:
        parser.error(f"no results.json found under {', '.join(map(str, args.dirs))}")
    summary = summarise(runs, args.metric, args.reference)
    table = markdown(summary)
    out = args.dirs[0]
    atomic_write_text(out / "table.md", table + "\n")
    atomic_write_text(out / "table.csv", to_csv(summary))
    atomic_write_json(out / "summary.json", summary)
    print(table)
    print(f"\n{len(runs)} runs; table written to {out / 'table.md'} (csv, summary.json beside it)")
    return summary


if __name__ == "__main__":
    main()
