"""Plots of a sweep summary (benchmarks.tables), written as PNG and SVG beside table.md.

Per table: the variants as bars with the 95% t-interval over seeds; a forest plot of the paired
differences to the reference; the probe's sorted score spectrum with k_p marked; and for every
sweep over one numeric setting (beta, optim.lr, data.train_fraction...) mean vs value with a
95% band, and each series' paired difference to the reference at the same value; for runs that
scored validation ROUGE-L while training, the learning curves. Per
stage=removal run: the teacher's metric vs m with top-m, bottom-m and random-m dims removed
(random: mean with a ±std band). `plot_files(summary, out_dir)` is the one entry point (a W&B
logger can log the files).

Figures are built with matplotlib's object API (no pyplot), so plotting never touches a global
backend or figure registry: safe inside a training process and in tests, no display needed.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import re
from collections import defaultdict
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator

from benchmarks.tables import mean_curve, width_ratio_series
from flexkd.storage import atomic_write_bytes

FORMATS = ("png", "svg")


def plot_files(summary: dict, out_dir: str | Path) -> list[Path]:
    """Write every plot of `summary` into `out_dir`; returns the files written (PNG and SVG)."""
    out_dir = Path(out_dir)
    split = summary.get("split", "test")
    suffix = "" if split == "test" else f".{split}"
    written: list[Path] = []
    for table in summary["tables"]:
        stem = out_dir / (_slug(f"{table['pair']}_{table['task']}_{table['metric']}") + suffix)
        if split != "test":  # the axis labels name the split the numbers come from
            table = {**table, "metric": f"{table['metric']} ({split})"}
        written += _save(bars(table), f"{stem}.bars")
        if any(r.get("vs") for r in table["rows"]):
            written += _save(forest(table), f"{stem}.forest")
        if any(r.get("probe") for r in table["rows"]):
            written += _save(spectra(table), f"{stem}.spectrum")
        for dim, series in numeric_sweeps(table["rows"]).items():
            written += _save(sweep(table, dim, series), f"{stem}.sweep-{_slug(dim)}")
        if any(r.get("curves") for r in table["rows"]):
            written += _save(learning_curves(table), f"{stem}.learning-curve")
    for (task, metric), series in width_ratio_series(summary).items():
        written += _save(ratio_lines(task, metric, series),
                         str(out_dir / _slug(f"{task}_{metric}{suffix}.width-ratio")))
    for entry in summary.get("removal", []):
        written += _save(removal(entry), str(out_dir / _slug(
            f"{entry['pair']}_{entry['task']}_{entry['metric']}.removal-{entry['label']}")))
    return written


# ----------------------------------------------------------------------------- figures

def bars(table: dict) -> Figure:
    rows = table["rows"]
    fig = Figure(figsize=(max(4.0, 0.9 * len(rows) + 2), 3.6))
    ax = fig.add_subplot()
    x = range(len(rows))
    means = [r["mean"] for r in rows]
    ax.bar(x, means, color="#8fb3d9", edgecolor="#34618f")
    for i, r in enumerate(rows):
        lo, hi = r["ci95"]
        if _finite(lo, hi):  # one seed: no interval to draw
            ax.errorbar(i, r["mean"], yerr=[[r["mean"] - lo], [hi - r["mean"]]], color="black", capsize=4)
        seeds = list(r["scores"].values())
        ax.scatter([i] * len(seeds), seeds, s=10, color="black", zorder=3)
    teacher = [r["teacher"] for r in rows if _finite(r.get("teacher"))]
    if teacher:
        ax.axhline(sum(teacher) / len(teacher), color="gray", linestyle="--", label="teacher")
        ax.legend(loc="lower right", fontsize=8)
    values = [v for r in rows for v in (*r["scores"].values(), *r["ci95"]) if _finite(v)] + teacher
    if values:  # zoom on the data: at CPU scale the differences are a few points of accuracy
        lo, hi = min(values), max(values)
        pad = 0.15 * (hi - lo) or 0.05 * abs(hi) or 0.05
        ax.set_ylim(lo - pad, hi + pad)
    ax.set_xticks(list(x), [r["variant"] for r in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(f"student {table['metric']}")
    ax.set_title(f"{table['pair']} / {table['task']}: mean and 95% CI over seeds (axis zoomed)", fontsize=9)
    return fig


def forest(table: dict) -> Figure:
    rows = [r for r in table["rows"] if r.get("vs")]
    ref = next((r for r in table["rows"] if r["variant"] == table["reference"]), None)
    fig = Figure(figsize=(6.0, 1.2 + 0.45 * len(rows)))
    ax = fig.add_subplot()
    spread = ref["std"] if ref else math.nan
    if _finite(spread):
        ax.axvspan(-spread, spread, color="#dddddd", label=f"± {table['reference']} seed std")
    ax.axvline(0.0, color="black", linewidth=1)
    for y, r in enumerate(rows):
        vs = r["vs"]
        lo, hi = vs["ci95"]
        err = [[vs["mean_diff"] - lo], [hi - vs["mean_diff"]]] if _finite(lo, hi) else None
        ax.errorbar(vs["mean_diff"], y, xerr=err, fmt="o", color="#34618f", capsize=4)
    ax.set_yticks(range(len(rows)), [f"{r['variant']} (n={r['vs']['n']})" for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"Δ {table['metric']} vs {table['reference']} (paired on seeds, 95% CI)")
    if _finite(spread):
        ax.legend(loc="best", fontsize=8)
    return fig


def spectra(table: dict) -> Figure:
    fig = Figure(figsize=(6.0, 3.6))
    ax = fig.add_subplot()
    colors = _palette()
    for r in table["rows"]:
        probe = r.get("probe")
        if not probe:
            continue
        color = next(colors)
        points = [(i, s) for i, s in enumerate(probe["spectrum"], 1) if _finite(s) and s > 0]
        if not points:  # a log axis cannot show non-positive scores
            continue
        ax.plot([i for i, _ in points], [v for _, v in points], color=color,
                label=f"{r['variant']} (seed {probe['seed']})")
        for share, k in sorted((probe.get("effective_dims") or {}).items(), key=lambda kv: float(kv[0])):
            ax.axvline(k, color=color, linestyle=":", linewidth=1)
            ax.annotate(f"k_{share}={k}", (k, 1.0), xycoords=("data", "axes fraction"), rotation=90,
                        va="top", ha="right", fontsize=7, color=color)
    ax.set_yscale("log")
    ax.set_xlabel("rank of teacher dim (sorted by importance)")
    ax.set_ylabel("importance score")
    ax.set_title(f"{table['pair']} / {table['task']}: probe spectrum, k_p = dims holding share p",
                 fontsize=9)
    if ax.get_lines():
        ax.legend(loc="lower left", fontsize=7)
    return fig


def sweep(table: dict, dim: str, series: list[dict]) -> Figure:
    """Mean and 95% band vs the setting; below, where rows have a reference, each series'
    paired difference to its reference (matched on the setting: benchmarks.tables.reference_of)."""
    paired = any(r.get("vs") for s in series for _, r in s["points"])
    fig = Figure(figsize=(6.0, 6.4 if paired else 3.6))
    ax = fig.add_subplot(211 if paired else 111)
    xs_all = []
    for s, color in zip(series, _palette(), strict=False):
        points = sorted(s["points"], key=lambda p: p[0])
        xs = [x for x, _ in points]
        xs_all += xs
        ax.plot(xs, [r["mean"] for _, r in points], marker="o", color=color, label=s["label"])
        if all(_finite(*r["ci95"]) for _, r in points):  # one seed: no band
            ax.fill_between(xs, [r["ci95"][0] for _, r in points], [r["ci95"][1] for _, r in points],
                            color=color, alpha=0.2, linewidth=0)
    log_x = min(xs_all) > 0 and max(xs_all) / min(xs_all) >= 100
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(dim)
    ax.set_ylabel(f"student {table['metric']}")
    ax.set_title(f"{table['pair']} / {table['task']}: mean and 95% CI over seeds", fontsize=9)
    ax.legend(loc="best", fontsize=8)
    if paired:
        diff = fig.add_subplot(212, sharex=ax)
        diff.axhline(0.0, color="black", linewidth=1)
        for s, color in zip(series, _palette(), strict=False):
            points = sorted(((x, r["vs"]) for x, r in s["points"] if r.get("vs")), key=lambda p: p[0])
            if not points:  # the reference's own series
                continue
            xs = [x for x, _ in points]
            diff.plot(xs, [vs["mean_diff"] for _, vs in points], marker="o", color=color,
                      label=s["label"])
            if all(_finite(*vs["ci95"]) for _, vs in points):
                diff.fill_between(xs, [vs["ci95"][0] for _, vs in points],
                                  [vs["ci95"][1] for _, vs in points], color=color, alpha=0.2,
                                  linewidth=0)
        diff.set_xlabel(dim)
        diff.set_ylabel(f"Δ {table['metric']} vs {table['reference']}", fontsize=8)
        diff.set_title("paired difference to the reference (95% CI over seeds)", fontsize=9)
        diff.legend(loc="best", fontsize=8)
        fig.tight_layout()
    return fig


def ratio_lines(task: str, metric: str, series: list[dict]) -> Figure:
    """Each variant's paired difference to the reference (95% CI band) vs d_T/d_S; one point
    per pair, so the x axis spans pairs of one family at several student widths."""
    fig = Figure(figsize=(6.0, 3.6))
    ax = fig.add_subplot()
    ax.axhline(0.0, color="black", linewidth=1)
    for s, color in zip(series, _palette(), strict=False):
        xs = [x for x, _ in s["points"]]
        ax.plot(xs, [vs["mean_diff"] for _, vs in s["points"]], marker="o", color=color,
                label=s["label"])
        if all(_finite(*vs["ci95"]) for _, vs in s["points"]):
            ax.fill_between(xs, [vs["ci95"][0] for _, vs in s["points"]],
                            [vs["ci95"][1] for _, vs in s["points"]], color=color, alpha=0.2,
                            linewidth=0)
    ax.set_xscale("log", base=2)
    # Tick every measured ratio by its value: a log axis alone labels powers of 2 only, which
    # leaves ratios such as 1.5 and 3 unnamed.
    ratios = sorted({x for s in series for x, _ in s["points"]})
    ax.set_xticks(ratios, [f"{x:g}" for x in ratios])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("width ratio d_T / d_S")
    ax.set_ylabel(f"Δ {metric} vs {series[0]['reference']} (paired)")
    ax.set_title(f"{task}: paired difference to {series[0]['reference']} vs width ratio", fontsize=9)
    ax.legend(loc="best", fontsize=8)
    return fig


def learning_curves(table: dict) -> Figure:
    """Validation ROUGE-L vs training step of every variant that scored checkpoints while
    training: the mean over seeds at each step (steps every seed reached) and each seed thin."""
    fig = Figure(figsize=(6.0, 3.6))
    ax = fig.add_subplot()
    for r, color in zip([r for r in table["rows"] if r.get("curves")], _palette(), strict=False):
        for points in r["curves"].values():
            ax.plot([p[0] for p in points], [p[1] for p in points], color=color, alpha=0.3,
                    linewidth=0.8)
        mean = mean_curve(r)
        ax.plot(list(mean), list(mean.values()), marker="o", color=color,
                label=f"{r['variant']} (n={len(r['curves'])})")
    ax.set_xlabel("training step")
    ax.set_ylabel("validation rougeL (greedy)")
    ax.set_title(f"{table['pair']} / {table['task']}: learning curves (mean over seeds; thin: "
                 "each seed)", fontsize=9)
    ax.legend(loc="best", fontsize=8)
    return fig


def removal(entry: dict) -> Figure:
    """The teacher's metric vs m removed dims: top-m, bottom-m, random-m (mean, ±std band)."""
    fig = Figure(figsize=(6.0, 3.6))
    ax = fig.add_subplot()
    ms = entry["m"]
    ax.axhline(entry["baseline"], color="gray", linestyle="--", label="unablated teacher")
    ax.plot(ms, entry["top"], marker="o", color="#d62728", label="top-m removed")
    ax.plot(ms, entry["bottom"], marker="o", color="#2ca02c", label="bottom-m removed")
    mean, std = entry["random_mean"], entry["random_std"]
    ax.plot(ms, mean, marker="o", color="#1f77b4",
            label=f"random-m removed ({len(entry['random'][0])} draws, ± std)")
    ax.fill_between(ms, [a - b for a, b in zip(mean, std, strict=True)],
                    [a + b for a, b in zip(mean, std, strict=True)], color="#1f77b4", alpha=0.2,
                    linewidth=0)
    ax.set_xlabel(f"m ({'eigen-directions' if entry['selection'] == 'directions' else 'dims'} removed "
                  f"of d={entry['d']} at layer {entry['layer']})")
    ax.set_ylabel(f"teacher {entry['metric']}")
    ax.set_title(f"{entry['pair']} / {entry['task']}: {entry['label']}", fontsize=9)
    ax.legend(loc="best", fontsize=8)
    return fig


# ----------------------------------------------------------------------------- sweeps

def numeric_sweeps(rows: list[dict]) -> dict[str, list[dict]]:
    """{dim: [series]} for every dim that takes >= 3 numeric values among rows that agree on
    their strategy and every other coordinate. A series is {"label", "points": [(x, row)]}."""
    out: dict[str, list[dict]] = {}
    dims = sorted({d for r in rows for d in r.get("coords", {})})
    for dim in dims:
        groups: dict[str, list] = defaultdict(list)
        rest_of: dict[str, dict] = {}
        for r in rows:
            value = r.get("coords", {}).get(dim)
            if not _is_number(value):
                continue
            rest = {k: v for k, v in r["coords"].items() if k != dim}
            key = json.dumps([r["strategy"], rest], sort_keys=True, default=str)
            groups[key].append((float(value), r))
            rest_of[key] = {"strategy": r["strategy"], "rest": rest}
        found = [(key, pts) for key, pts in groups.items() if len({x for x, _ in pts}) >= 3]
        if not found:
            continue
        series = []
        for key, pts in found:
            strategy, rest = rest_of[key]["strategy"], rest_of[key]["rest"]
            # Name a series by what tells it apart from the other series of its strategy.
            siblings = [rest_of[k]["rest"] for k, _ in found if rest_of[k]["strategy"] == strategy]
            differing = {k: v for k, v in rest.items()
                         if any(json.dumps(s.get(k), default=str) != json.dumps(v, default=str)
                                for s in siblings)}
            label = strategy + (" " + ", ".join(f"{k}={v}" for k, v in sorted(differing.items()))
                                if differing else "")
            series.append({"label": label, "points": pts})
        out[dim] = sorted(series, key=lambda s: s["label"])
    return out


# ----------------------------------------------------------------------------- helpers

def _save(fig: Figure, stem: str) -> list[Path]:
    paths = []
    for fmt in FORMATS:
        buf = io.BytesIO()
        # No date in the SVG: rerunning the tables on the same runs gives the same files.
        fig.savefig(buf, format=fmt, bbox_inches="tight", dpi=120,
                    metadata={"Date": None} if fmt == "svg" else None)
        path = Path(f"{stem}.{fmt}")
        atomic_write_bytes(path, buf.getvalue())
        paths.append(path)
    return paths


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", text).strip("_")


def _finite(*values) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _palette():
    return itertools.cycle(["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2",
                            "#17becf"])
