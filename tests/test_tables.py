"""Sweep tables: aggregation over seeds and paired statistics against hand-computed values."""

import json
import math

import pytest

from benchmarks import tables


def write_run(root, idx, strategy, seed, acc, teacher=0.9):
    d = root / str(idx)
    d.mkdir(parents=True)
    (d / "results.json").write_text(json.dumps({
        "pair": "p", "task": "t", "strategy": strategy, "seed": seed, "main_metric": "accuracy",
        "metrics": {"student": {"accuracy": acc}, "teacher": {"accuracy": teacher}},
        "params": {"strategy_extra_trainable": 0}, "timings": {"distill": 2.0}}))


def test_mean_std_and_paired_difference(tmp_path):
    flex = {0: 0.80, 1: 0.82, 2: 0.84}
    sft = {0: 0.78, 1: 0.81, 2: 0.80}
    i = 0
    for strategy, scores in (("flexkd", flex), ("sft", sft)):
        for seed, acc in scores.items():
            write_run(tmp_path, i, strategy, seed, acc)
            i += 1
    summary = tables.main([str(tmp_path)])
    rows = {r["strategy"]: r for r in summary["rows"]}
    assert rows["flexkd"]["mean"] == pytest.approx(0.82)
    assert rows["flexkd"]["std"] == pytest.approx(0.02)
    vs = rows["flexkd"]["vs"]
    # diffs 0.02, 0.01, 0.04: mean 0.02333, sd 0.015275, t = 2.6458 on 2 dof -> p = 0.1181
    assert vs["mean_diff"] == pytest.approx(0.07 / 3)
    assert vs["p_value"] == pytest.approx(0.1181, abs=5e-4)
    half = 4.302653 * 0.0152753 / math.sqrt(3)
    assert vs["ci95"] == pytest.approx([0.07 / 3 - half, 0.07 / 3 + half], abs=1e-5)
    assert "vs" not in rows["sft"]
    assert (tmp_path / "table.md").exists() and (tmp_path / "table.csv").exists()


def test_paired_test_uses_only_matched_seeds():
    out = tables.paired_test({0: 1.0, 1: 2.0, 5: 9.0}, {0: 0.5, 1: 1.0})
    assert out["seeds"] == [0, 1] and out["mean_diff"] == pytest.approx(0.75)


def test_no_results_is_an_error(tmp_path):
    with pytest.raises(SystemExit):
        tables.main([str(tmp_path)])
