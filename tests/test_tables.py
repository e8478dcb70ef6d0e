"""Sweep tables: variants never share a row, paired statistics against hand-computed values, plots."""

import copy
import json
import math
from pathlib import Path

import pytest

from benchmarks import plots, tables

BASE_CONFIG = {
    "seed": 0, "cache_dir": "/tmp/cache", "resume": "auto", "output_dir": None,
    "data": {"batch_size": 32, "eval_batch_size": 64, "num_workers": 0},
    "optim": {"lr": 5e-4, "weight_decay": 0.01},
    "teacher_finetune": {"enabled": True, "max_steps": 300, "seed": 0},
    "trainer": {"max_steps": 150, "enable_progress_bar": True},
    "logger": {"name": "csv"},
}
STRATEGY_DEFAULTS = {
    "flexkd": {"name": "flexkd", "beta": 0.1, "score": "grad", "feature_loss": "corr"},
    "sft": {"name": "sft", "beta": 0.0},
}


def write_run(root, name, strategy, seed, acc, teacher=0.9, settings=None, config=None,
              variant=True, spectrum=None, extra=None):
    """One results.json shaped like pipeline.run()'s (the parts tables read)."""
    d = root / name
    d.mkdir(parents=True)
    results = {"pair": "p", "task": "t", "strategy": strategy, "seed": seed, "main_metric": "accuracy",
               "metrics": {"student": {"accuracy": acc}, "teacher": {"accuracy": teacher}},
               "params": {"strategy_extra_trainable": 0}, "timings": {"distill": 2.0}}
    if config is not None or settings is not None:
        cfg = copy.deepcopy(BASE_CONFIG)
        cfg["seed"] = seed
        cfg["strategy"] = {**STRATEGY_DEFAULTS[strategy], **(settings or {})}
        for dotted, value in (config or {}).items():
            section, key = dotted.split(".")
            cfg[section][key] = value
        results["config"] = cfg
    if variant:
        settings = settings or {}
        label = strategy + (f"[{','.join(f'{k}={v}' for k, v in sorted(settings.items()))}]"
                            if settings else "")
        results["variant"] = {"strategy": strategy, "settings": settings, "label": label}
    if spectrum is not None:
        results["probe"] = {"probes": [{"spectrum": spectrum, "k": 2,
                                        "effective_dims": {"0.5": 1, "0.9": 3}}]}
    results.update(extra or {})
    (d / "results.json").write_text(json.dumps(results))
    return d


def rows_by_variant(summary):
    (table,) = summary["tables"]
    return {r["variant"]: r for r in table["rows"]}


def test_mean_std_and_paired_difference(tmp_path):
    flex = {0: 0.80, 1: 0.82, 2: 0.84}
    sft = {0: 0.78, 1: 0.81, 2: 0.80}
    for strategy, scores in (("flexkd", flex), ("sft", sft)):
        for seed, acc in scores.items():
            write_run(tmp_path, f"{strategy}{seed}", strategy, seed, acc, variant=False)
    summary = tables.main([str(tmp_path), "--no-plots"])
    rows = rows_by_variant(summary)
    assert rows["flexkd"]["mean"] == pytest.approx(0.82)
    assert rows["flexkd"]["std"] == pytest.approx(0.02)
    vs = rows["flexkd"]["vs"]
    # diffs 0.02, 0.01, 0.04: mean 0.02333, sd 0.015275, t = 2.6458 on 2 dof -> p = 0.1181
    assert vs["mean_diff"] == pytest.approx(0.07 / 3)
    assert vs["p_value"] == pytest.approx(0.1181, abs=5e-4)
    half = 4.302653 * 0.0152753 / math.sqrt(3)
    assert vs["ci95"] == pytest.approx([0.07 / 3 - half, 0.07 / 3 + half], abs=1e-5)
    # The seed t-interval of the flexkd mean: 0.82 +- 4.302653 * 0.02 / sqrt(3)
    assert rows["flexkd"]["ci95"] == pytest.approx([0.82 - 0.049683, 0.82 + 0.049683], abs=1e-5)
    # sft's seed std is 0.015275 < 0.02333: the difference is outside the seed spread.
    assert vs["within_seed_std"] is False and summary["tables"][0]["note"] is None
    assert rows["sft"]["vs"] is None
    assert (tmp_path / "table.md").exists() and (tmp_path / "table.csv").exists()


def test_paired_test_uses_only_matched_seeds():
    out = tables.paired_test({0: 1.0, 1: 2.0, 5: 9.0}, {0: 0.5, 1: 1.0})
    assert out["seeds"] == [0, 1] and out["mean_diff"] == pytest.approx(0.75)
    # diffs 0.5, 1.0: sd 0.35355, t_0.975(1) = 12.7062 -> half 12.7062 * 0.35355 / sqrt 2 = 3.1766
    assert out["ci95"] == pytest.approx([0.75 - 3.17655, 0.75 + 3.17655], abs=1e-4)


def test_identical_differences_are_exact():
    out = tables.paired_test({0: 1.5, 1: 2.5}, {0: 1.0, 1: 2.0})
    assert out["ci95"] == [0.5, 0.5] and out["p_value"] == 0.0


def test_one_seed_summary_is_strict_json(tmp_path):
    # One seed has no std, no interval and no paired test: the table shows "-", the file null.
    write_run(tmp_path, "flexkd0", "flexkd", 0, 0.8, settings={})
    for beta, acc in ((0.01, 0.78), (1.0, 0.82)):
        write_run(tmp_path, f"flexkd_{beta}", "flexkd", 0, acc, settings={"beta": beta})
    write_run(tmp_path, "sft0", "sft", 0, 0.7, settings={})
    summary = tables.main([str(tmp_path)])
    assert math.isnan(rows_by_variant(summary)["flexkd"]["std"])

    def reject(constant):
        raise ValueError(f"{constant} is not JSON")

    saved = json.loads((tmp_path / "summary.json").read_text(), parse_constant=reject)
    flex = rows_by_variant(saved)["flexkd"]
    assert flex["mean"] == 0.8 and flex["std"] is None and flex["ci95"] == [None, None]
    assert flex["vs"]["mean_diff"] == pytest.approx(0.1) and flex["vs"]["p_value"] is None
    # A logger plotting from the file draws the same plots (no bands where there is no interval).
    replotted = plots.plot_files(saved, tmp_path / "replot")
    assert sorted(p.name for p in replotted) == sorted(saved["plots"])
    assert any(".sweep-beta." in name for name in saved["plots"])


def test_learning_curves_from_validation_scores_during_training(tmp_path):
    def history(*points):
        return {"checkpoint_selection": {"select_checkpoint": "best_val_rougeL",
                                         "history": [{"step": s, "rougeL": v} for s, v in points]}}

    write_run(tmp_path, "f0", "flexkd", 0, 20.0, extra=history((10, 5.0), (20, 9.0), (30, 11.0)))
    # Seed 1 stopped at step 20 (a shorter budget): the mean covers the steps both reached.
    write_run(tmp_path, "f1", "flexkd", 1, 22.0, extra=history((10, 7.0), (20, 12.0)))
    write_run(tmp_path, "s0", "sft", 0, 18.0, extra=history((10, 4.0), (20, 6.0)))
    write_run(tmp_path, "s1", "sft", 1, 19.0)  # selected the last checkpoint: no curve
    summary = tables.main([str(tmp_path)])
    rows = rows_by_variant(summary)
    assert rows["flexkd"]["curves"] == {0: [[10, 5.0], [20, 9.0], [30, 11.0]], 1: [[10, 7.0], [20, 12.0]]}
    assert tables.mean_curve(rows["flexkd"]) == {10: 6.0, 20: 10.5}
    assert tables.mean_curve(rows["sft"]) == {10: 4.0, 20: 6.0}
    table_md = (tmp_path / "table.md").read_text()
    assert "| variant | step 10 | step 20 |" in table_md
    assert "| flexkd | 6.00 | 10.50 |" in table_md and "| sft | 4.00 | 6.00 |" in table_md
    png = tmp_path / "p_t_accuracy.learning-curve.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Runs without a validation history draw no learning curve.
    assert not rows_by_variant(tables.main([str(tmp_path / "s1"), "--no-plots"]))["sft"]["curves"]


def test_no_results_is_an_error(tmp_path):
    with pytest.raises(SystemExit):
        tables.main([str(tmp_path)])


def mixed_sweep(root):
    """flexkd score=grad, flexkd score=random and sft on seeds 0, 1."""
    scores = {"flexkd": {0: 0.80, 1: 0.84}, "flexkd[score=random]": {0: 0.70, 1: 0.76},
              "sft": {0: 0.75, 1: 0.77}}
    for label, by_seed in scores.items():
        strategy = label.split("[")[0]
        settings = {"score": "random"} if "random" in label else {}
        for seed, acc in by_seed.items():
            write_run(root, f"{label}-{seed}", strategy, seed, acc, settings=settings)
    return scores


def test_ablation_variant_gets_its_own_row(tmp_path):
    mixed_sweep(tmp_path)
    summary = tables.main([str(tmp_path), "--no-plots"])
    rows = rows_by_variant(summary)
    assert sorted(rows) == ["flexkd", "flexkd[score=random]", "sft"]
    assert rows["flexkd"]["mean"] == pytest.approx(0.82)
    assert rows["flexkd[score=random]"]["mean"] == pytest.approx(0.73)
    assert rows["flexkd[score=random]"]["settings"] == {"score": "random"}
    assert rows["sft"]["mean"] == pytest.approx(0.76)
    assert all(r["n_seeds"] == 2 for r in rows.values())
    assert summary["tables"][0]["reference"] == "sft"
    assert rows["flexkd"]["vs"]["mean_diff"] == pytest.approx(0.06)
    assert "flexkd[score=random]" in (tmp_path / "table.md").read_text()


def test_old_runs_without_variant_split_on_their_strategy_config(tmp_path):
    for seed, (grad, rand) in enumerate(((0.80, 0.70), (0.84, 0.76))):
        write_run(tmp_path, f"g{seed}", "flexkd", seed, grad, config={}, variant=False)
        write_run(tmp_path, f"r{seed}", "flexkd", seed, rand, settings={"score": "random"},
                  variant=False)
    rows = rows_by_variant(tables.summarise(tables.load_runs([tmp_path])))
    assert rows["flexkd[score=grad]"]["mean"] == pytest.approx(0.82)
    assert rows["flexkd[score=random]"]["mean"] == pytest.approx(0.73)


def test_runs_recorded_at_different_defaults_do_not_merge(tmp_path):
    # Both runs recorded `flexkd` (every knob at its default), but the default beta changed
    # between them (0.5 then 0.1): one row each, labelled by the value each was run with.
    for name, beta, acc in (("old", 0.5, 0.80), ("new", 0.1, 0.84)):
        d = write_run(tmp_path, name, "flexkd", 0, acc, settings={"beta": beta})
        results = json.loads((d / "results.json").read_text())
        results["variant"] = {"strategy": "flexkd", "settings": {}, "label": "flexkd"}
        (d / "results.json").write_text(json.dumps(results))
    write_run(tmp_path, "sft", "sft", 0, 0.78, config={})
    rows = rows_by_variant(tables.summarise(tables.load_runs([tmp_path])))
    assert sorted(rows) == ["flexkd[beta=0.1]", "flexkd[beta=0.5]", "sft"]
    assert rows["flexkd[beta=0.5]"]["mean"] == pytest.approx(0.80)
    assert rows["flexkd[beta=0.1]"]["mean"] == pytest.approx(0.84)


def test_duplicate_run_across_sweeps_names_both_dirs(tmp_path):
    mixed_sweep(tmp_path / "a")
    write_run(tmp_path / "b", "again", "flexkd", 1, 0.99, settings={"score": "random"})
    with pytest.raises(tables.DuplicateRunError):
        tables.summarise(tables.load_runs([tmp_path / "a", tmp_path / "b"]))
    with pytest.raises(SystemExit) as err:
        tables.main([str(tmp_path / "a"), str(tmp_path / "b"), "--no-plots"])
    message = str(err.value.code)
    assert str(tmp_path / "a" / "flexkd[score=random]-1") in message
    assert str(tmp_path / "b" / "again") in message and "flexkd[score=random]" in message


def test_two_sweeps_combine_and_overlapping_dirs_count_once(tmp_path):
    mixed_sweep(tmp_path / "a")
    write_run(tmp_path / "b", "beta", "flexkd", 0, 0.81, settings={"beta": 1.0})
    # `a` and its own subdirectory: the same files, not duplicates.
    summary = tables.main([str(tmp_path / "a"), str(tmp_path / "a" / "sft-0"), str(tmp_path / "b"),
                           "--no-plots"])
    rows = rows_by_variant(summary)
    assert sorted(rows) == ["flexkd", "flexkd[beta=1.0]", "flexkd[score=random]", "sft"]


def test_reference_takes_a_variant_label(tmp_path):
    mixed_sweep(tmp_path)
    summary = tables.main([str(tmp_path), "--reference", "flexkd[score=random]", "--no-plots"])
    table = summary["tables"][0]
    rows = rows_by_variant(summary)
    assert table["reference"] == "flexkd[score=random]"
    assert rows["flexkd[score=random]"]["vs"] is None
    # flexkd - random: 0.10, 0.08 -> 0.09; sft - random: 0.05, 0.01 -> 0.03
    assert rows["flexkd"]["vs"]["mean_diff"] == pytest.approx(0.09)
    assert rows["sft"]["vs"]["mean_diff"] == pytest.approx(0.03)
    assert rows["sft"]["vs"]["reference"] == "flexkd[score=random]"
    # random's seed std 0.042426: sft's 0.03 lies within it, flexkd's 0.09 does not.
    assert rows["sft"]["vs"]["within_seed_std"] is True
    assert rows["flexkd"]["vs"]["within_seed_std"] is False
    with pytest.raises(SystemExit, match="no variant"):
        tables.main([str(tmp_path), "--reference", "flexkd[score=fisher]", "--no-plots"])


def test_sentence_when_all_differences_lie_within_the_seed_spread(tmp_path):
    for seed, (flex, sft) in enumerate(((0.80, 0.79), (0.70, 0.72))):
        write_run(tmp_path, f"f{seed}", "flexkd", seed, flex)
        write_run(tmp_path, f"s{seed}", "sft", seed, sft)
    summary = tables.main([str(tmp_path), "--no-plots"])
    table = summary["tables"][0]
    assert table["all_within_seed_std"] is True
    assert "within one seed std" in table["note"]
    assert table["note"] in (tmp_path / "table.md").read_text()


def test_differing_budget_makes_separate_rows(tmp_path):
    for seed in (0, 1):
        # A value that follows the run's seed everywhere (seed-derived) is no variant difference.
        follows = {"teacher_finetune.seed": seed}
        write_run(tmp_path, f"a{seed}", "sft", seed, 0.70 + seed / 100,
                  config={"optim.lr": 1e-4, **follows})
        write_run(tmp_path, f"b{seed}", "sft", seed, 0.80 + seed / 100,
                  config={"optim.lr": 5e-4, **follows})
        # Neutral differences (progress bar, cache dir) do not split rows either.
        write_run(tmp_path, f"c{seed}", "flexkd", seed, 0.90,
                  config={"optim.lr": 5e-4, "trainer.enable_progress_bar": False, **follows})
    summary = tables.main([str(tmp_path), "--no-plots"])
    rows = rows_by_variant(summary)
    assert sorted(rows) == ["flexkd {optim.lr=0.0005}", "sft {optim.lr=0.0001}", "sft {optim.lr=0.0005}"]
    assert rows["sft {optim.lr=0.0001}"]["mean"] == pytest.approx(0.705)
    assert rows["sft {optim.lr=0.0005}"]["config"] == {"optim.lr": 5e-4}
    assert summary["tables"][0]["varying_config"] == ["optim.lr"]



def test_rescored_students_join_their_training_jobs_rows(tmp_path):
    """`stage=eval eval_model=<job>/student` results take the job's strategy and seed (the
    re-scoring's own seed is 0), and a differing eval section keeps them apart from the job's
    own scores, and so does a differing test subset."""
    sampled, greedy = {}, {}
    for strategy, scores in (("flexkd", {1: (0.30, 0.60), 2: (0.32, 0.66)}),
                             ("sft", {1: (0.28, 0.50), 2: (0.30, 0.58)})):
        for seed, (on_train, rescored) in scores.items():
            job = write_run(tmp_path / "sweep", f"{strategy}{seed}", strategy, seed, on_train,
                            settings={})
            results = json.loads((job / "results.json").read_text())
            results["config"].update(eval={"sampling": True}, task={"max_test_examples": 64})
            (job / "results.json").write_text(json.dumps(results))
            rescore(job, tmp_path / "greedy" / f"{strategy}{seed}", rescored, sampling=False)
            if strategy == "sft":  # greedy again, on the first 32 test examples only
                rescore(job, tmp_path / "subset" / f"{seed}", rescored - 0.1, sampling=False,
                        max_test_examples=32)
            sampled.setdefault(strategy, []).append(on_train)
            greedy.setdefault(strategy, []).append(rescored)

    runs = tables.load_runs([tmp_path / "greedy"])
    assert sorted((r["strategy"], r["seed"]) for r in runs) == [
        ("flexkd", 1), ("flexkd", 2), ("sft", 1), ("sft", 2)]
    assert all(r["rescored_from"].startswith(str(tmp_path / "sweep")) for r in runs)
    rows = rows_by_variant(tables.main([str(tmp_path / "greedy"), "--reference", "sft",
                                        "--no-plots"]))
    assert rows["flexkd"]["mean"] == pytest.approx(0.63)
    assert rows["flexkd"]["vs"]["mean_diff"] == pytest.approx(0.09)  # 0.10 and 0.08, seeds 1, 2
    assert math.isnan(rows["flexkd"]["teacher"])  # the re-scoring scored no teacher

    both = rows_by_variant(tables.main([str(tmp_path / "sweep"), str(tmp_path / "greedy"),
                                        "--no-plots"]))
    assert {label: row["mean"] for label, row in both.items()} == pytest.approx({
        "flexkd {eval.sampling=false}": 0.63, "flexkd {eval.sampling=true}": 0.31,
        "sft {eval.sampling=false}": 0.54, "sft {eval.sampling=true}": 0.29})

    # Another test subset is another measurement: its own row, not merged into the job's.
    subset = rows_by_variant(tables.main([str(tmp_path / "greedy"), str(tmp_path / "subset"),
                                          "--no-plots"]))
    assert {label: row["mean"] for label, row in subset.items()} == pytest.approx({
        "flexkd {task.max_test_examples=64}": 0.63, "sft {task.max_test_examples=64}": 0.54,
        "sft {task.max_test_examples=32}": 0.44})


def rescore(job: Path, out: Path, score: float, sampling: bool, max_test_examples: int = 64):
    """A `stage=eval eval_model=<job>/student` results.json in `out`."""
    config = {**copy.deepcopy(BASE_CONFIG), "seed": 0, "stage": "eval",
              "eval_model": str(job / "student"), "eval": {"sampling": sampling},
              "task": {"max_test_examples": max_test_examples}}
    out.mkdir(parents=True)
    (out / "results.json").write_text(json.dumps({
        "stage": "eval", "model": str(job / "student"), "pair": "p", "task": "t",
        "strategy": "eval", "seed": 0, "main_metric": "accuracy",
        "metrics": {"student": {"accuracy": score}}, "config": config}))


def test_plots_of_a_beta_sweep(tmp_path):
    spectrum = [4.0, 2.0, 1.0, 0.5, 0.0]
    for seed in (0, 1):
        for beta, acc in ((0.01, 0.78), (0.1, 0.80), (1.0, 0.83)):
            # beta=0.1 is flexkd's default: its variant records no setting, only its config does.
            settings = {} if beta == 0.1 else {"beta": beta}
            write_run(tmp_path, f"f{beta}-{seed}", "flexkd", seed, acc + seed / 100,
                      settings=settings, spectrum=spectrum)
        write_run(tmp_path, f"s{seed}", "sft", seed, 0.77 + seed / 100, config={})
    summary = tables.main([str(tmp_path)])
    table = summary["tables"][0]
    sweeps = plots.numeric_sweeps(table["rows"])
    assert list(sweeps) == ["beta"]
    (series,) = sweeps["beta"]
    assert series["label"] == "flexkd"
    assert sorted(x for x, _ in series["points"]) == [0.01, 0.1, 1.0]
    assert {r["variant"]: r["probe"]["seed"] for r in table["rows"] if r["probe"]} == {
        "flexkd": 0, "flexkd[beta=0.01]": 0, "flexkd[beta=1.0]": 0}
    for kind in ("bars", "forest", "spectrum", "sweep-beta"):
        png, svg = tmp_path / f"p_t_accuracy.{kind}.png", tmp_path / f"p_t_accuracy.{kind}.svg"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", kind
        assert svg.stat().st_size > 0 and b"<svg" in svg.read_bytes()[:2000], kind
    # summary.json lists exactly the plot files written (what a W&B logger would log).
    expected = sorted(f"p_t_accuracy.{k}.{fmt}" for k in ("bars", "forest", "spectrum", "sweep-beta")
                      for fmt in ("png", "svg"))
    assert sorted(json.loads((tmp_path / "summary.json").read_text())["plots"]) == expected
    assert sorted(p.name for p in tmp_path.glob("*.??g")) == expected
    # A logger may plot from summary.json (seed keys become strings there): the same sweep.
    reloaded = json.loads((tmp_path / "summary.json").read_text())["tables"][0]["rows"]
    assert sorted(x for x, _ in plots.numeric_sweeps(reloaded)["beta"][0]["points"]) == [0.01, 0.1, 1.0]
