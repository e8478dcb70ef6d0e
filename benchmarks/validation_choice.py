"""Choosing a knob on the validation split (benchmarks.tables --split validation).

A default chosen by its test score would be tuned on the test set, so a sweep is ranked on the
validation metrics every run records (results.json `metrics.validation`) instead: `on_split`
hands benchmarks.tables runs whose metrics are those of the split asked for, and
`best_on_validation` picks, per strategy swept over one numeric knob, the value with the best
mean over seeds.
"""

from __future__ import annotations

import json
import math

from flexkd.errors import UserError

SPLITS = ("test", "validation")
# Metrics where less is better (the harness's loss/perplexity, lm-eval's perplexities and bpb).
LOWER_IS_BETTER = ("loss", "perplexity", "bits_per_byte")


class MissingSplitMetricError(UserError, ValueError):
    """No run records the metric on the chosen split."""


def higher_is_better(metric: str) -> bool:
    return not any(word in metric for word in LOWER_IS_BETTER)


def on_split(runs: list[dict], split: str, metric: str | None = None) -> list[dict]:
    """The runs with `metrics` replaced by those of `split`: test metrics are results.json's
    metrics.student/teacher, validation metrics its metrics.validation.student/teacher."""
    if split not in SPLITS:
        raise UserError(f"--split {split!r} is not a split; use one of {', '.join(SPLITS)}")
    if split == "test":
        return runs
    out = []
    for run in runs:
        validation = (run.get("metrics") or {}).get("validation") or {}
        out.append({**run, "metrics": {who: dict(validation.get(who) or {})
                                       for who in ("student", "teacher")}})
    wanted = {metric or r.get("main_metric") for r in out}
    if not any(metric_name in r["metrics"]["student"] for r in out for metric_name in wanted):
        recorded = sorted({k for r in out for k in r["metrics"]["student"]})
        raise MissingSplitMetricError(
            f"no run records {', '.join(sorted(map(str, wanted)))} on the validation split; "
            f"pass --metric with one it records ({', '.join(recorded) or 'none'})")
    return out


def best_on_validation(table: dict) -> dict[str, dict]:
    """{strategy: {knob, value, mean, ci, variant, n_seeds, higher_is_better, candidates}} for
    every strategy whose rows in `table` differ in exactly one coordinate, a number taking >= 2
    values (a default-valued run counts at its configured value, see tables._coords). The best
    mean wins; on a tie the smaller value (the weaker setting)."""
    higher = higher_is_better(str(table["metric"]))
    by_strategy: dict[str, list[dict]] = {}
    for row in table["rows"]:
        if row["n_seeds"] and not math.isnan(row["mean"]):
            by_strategy.setdefault(row["strategy"], []).append(row)
    out = {}
    for strategy, rows in sorted(by_strategy.items()):
        keys = set().union(*(r["coords"] for r in rows))
        varying = [k for k in sorted(keys)
                   if len({json.dumps(r["coords"].get(k), sort_keys=True) for r in rows}) > 1]
        if len(varying) != 1 or not all(_is_number(r["coords"].get(varying[0])) for r in rows):
            continue
        knob = varying[0]
        ranked = sorted(rows, key=lambda r: ((-r["mean"] if higher else r["mean"]), r["coords"][knob]))
        best = ranked[0]
        out[strategy] = {"knob": knob, "value": best["coords"][knob], "mean": best["mean"],
                         "ci": best["ci95"], "variant": best["variant"], "n_seeds": best["n_seeds"],
                         "higher_is_better": higher,
                         "candidates": {str(r["coords"][knob]): r["mean"]
                                        for r in sorted(rows, key=lambda r: r["coords"][knob])}}
    return out


def collect(tables: list[dict]) -> dict[str, dict]:
    """The per-table choices as one dict keyed by strategy (each entry names its pair, task and
    metric); a strategy chosen in several tables gets one key per table, `strategy@pair/task/metric`."""
    entries = [(strategy, t, choice) for t in tables
               for strategy, choice in (t.get("best_on_validation") or {}).items()]
    counts: dict[str, int] = {}
    for strategy, _, _ in entries:
        counts[strategy] = counts.get(strategy, 0) + 1
    out = {}
    for strategy, t, choice in entries:
        key = strategy if counts[strategy] == 1 else f"{strategy}@{t['pair']}/{t['task']}/{t['metric']}"
        out[key] = {**choice, "pair": t["pair"], "task": t["task"], "metric": t["metric"]}
    return out


def choice_lines(table: dict) -> list[str]:
    """table.md lines: `chosen on validation: flexkd beta=0.25 (accuracy 0.8125, 95% CI [..])`."""
    lines = []
    for strategy, c in (table.get("best_on_validation") or {}).items():
        lo, hi = c["ci"]
        others = ", ".join(f"{v}: {_f(m)}" for v, m in c["candidates"].items())
        lines.append(f"chosen on validation: {strategy} {c['knob']}={c['value']} "
                     f"({table['metric']} {_f(c['mean'])}, 95% CI [{_f(lo)}, {_f(hi)}], "
                     f"{c['n_seeds']} seeds; {'highest' if c['higher_is_better'] else 'lowest'} "
                     f"mean among {others})")
    return lines


def _f(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
