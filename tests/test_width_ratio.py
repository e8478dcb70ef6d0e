"""The width-ratio view: each method's paired difference to sft vs d_T/d_S, across pairs."""

import json

import pytest

from benchmarks import tables

# (pair, d_T/d_S) -> per-strategy accuracy offset to add to sft's, on every seed
PAIRS = {"w384": 2.0, "w192": 4.0, "w96": 8.0}
SFT = {0: 0.70, 1: 0.72, 2: 0.74}


def write(root, pair, ratio, strategy, seed, acc):
    d = root / f"{pair}-{strategy}-{seed}"
    d.mkdir(parents=True)
    d.joinpath("results.json").write_text(json.dumps({
        "pair": pair, "task": "rt", "strategy": strategy, "seed": seed, "main_metric": "accuracy",
        "metrics": {"student": {"accuracy": acc}, "teacher": {"accuracy": 0.9}},
        "variant": {"strategy": strategy, "settings": {}, "label": strategy},
        "width_ratio": ratio, "timings": {}}))


def test_paired_differences_to_sft_line_up_by_width_ratio(tmp_path):
    for pair, ratio in PAIRS.items():
        for seed, base in SFT.items():
            write(tmp_path, pair, ratio, "sft", seed, base)
            # flexkd's lead grows with the ratio (+0.01 per doubling, a seed wobble of 0.002)
            write(tmp_path, pair, ratio, "flexkd", seed, base + 0.01 * ratio / 2 + 0.002 * seed)
            write(tmp_path, pair, ratio, "projection", seed, base - 0.01)
    summary = tables.main([str(tmp_path)])
    series = tables.width_ratio_series(summary)
    assert list(series) == [("rt", "accuracy")]
    by_label = {s["label"]: s for s in series[("rt", "accuracy")]}
    assert set(by_label) == {"flexkd", "projection"} and by_label["flexkd"]["reference"] == "sft"
    flex = by_label["flexkd"]["points"]
    assert [x for x, _ in flex] == [2.0, 4.0, 8.0]
    # mean of (0.01 * r / 2 + 0.002 * seed) over seeds 0, 1, 2
    for (_, vs), expected in zip(flex, (0.012, 0.022, 0.042), strict=True):
        assert vs["mean_diff"] == pytest.approx(expected) and vs["n"] == 3
        assert vs["ci95"][0] < expected < vs["ci95"][1]
    assert all(vs["mean_diff"] == pytest.approx(-0.01) for _, vs in by_label["projection"]["points"])
    assert {"rt_accuracy.width-ratio.png", "rt_accuracy.width-ratio.svg"} <= set(summary["plots"])
    assert (tmp_path / "rt_accuracy.width-ratio.png").read_bytes()[:4] == b"\x89PNG"


def test_ratio_plot_names_every_measured_ratio_on_its_axis(tmp_path):
    """Ratios that are not powers of 2 (SmolLM2's 1.5 and 3) get a labelled tick each."""
    from benchmarks import plots

    for pair, ratio in {"w384": 1.5, "w288": 2.0, "w192": 3.0}.items():
        for seed, base in SFT.items():
            write(tmp_path, pair, ratio, "sft", seed, base)
            write(tmp_path, pair, ratio, "flexkd", seed, base + 0.01 + 0.002 * seed)
    series = tables.width_ratio_series(tables.main([str(tmp_path), "--no-plots"]))
    ax = plots.ratio_lines("rt", "accuracy", series[("rt", "accuracy")]).axes[0]
    assert list(ax.get_xticks()) == [1.5, 2.0, 3.0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1.5", "2", "3"]
    assert list(ax.xaxis.get_minorticklocs()) == []


def test_one_ratio_or_no_ratio_draws_no_ratio_plot(tmp_path):
    for seed, base in SFT.items():
        write(tmp_path, "w384", 2.0, "sft", seed, base)
        write(tmp_path, "w384", 2.0, "flexkd", seed, base + 0.01)
    assert tables.width_ratio_series(tables.main([str(tmp_path), "--no-plots"])) == {}
