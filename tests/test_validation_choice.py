"""benchmarks.tables --split validation: ranking on validation metrics, the knob value chosen per
strategy (hand-computed means), and the W&B report run of a table (offline, read back)."""

import json
import math
from pathlib import Path

import pytest

from benchmarks import tables, validation_choice, wandb_report
from tests.test_wandb_logging import read_offline_run, wandb_env  # noqa: F401 - a fixture

DEFAULTS = {"flexkd": {"beta": 0.5, "score": "grad"}, "projection": {"beta": 1.0}}


def write_run(root: Path, strategy: str, seed: int, test: float, validation: float, metric="accuracy",
              logger=None, **settings) -> Path:
    """One results.json as pipeline.run() writes it (the parts tables read): a setting equal to
    the strategy's default is not in the variant, but is in the config."""
    knobs = {**DEFAULTS[strategy], **settings}
    changed = {k: v for k, v in sorted(knobs.items()) if v != DEFAULTS[strategy][k]}
    label = strategy + (f"[{','.join(f'{k}={v}' for k, v in changed.items())}]" if changed else "")
    d = root / f"{label}-s{seed}"
    d.mkdir(parents=True)
    results = {
        "pair": "p", "task": "t", "strategy": strategy, "seed": seed, "main_metric": metric,
        "metrics": {"student": {metric: test}, "teacher": {metric: 0.9},
                    "validation": {"student": {metric: validation}, "teacher": {metric: 0.8}}},
        "variant": {"strategy": strategy, "settings": changed, "label": label},
        "config": {"seed": seed, "strategy": {"name": strategy, **knobs},
                   "trainer": {"max_steps": 100}, "logger": logger or {"name": "csv"}},
        "params": {"strategy_extra_trainable": 0}, "timings": {"distill": 1.0}}
    (d / "results.json").write_text(json.dumps(results))
    return d


def beta_sweep(root: Path, **kw) -> None:
    """flexkd over beta 0.1 / 0.5 (its default) / 2.0 and projection over 0.5 / 1.0 (default),
    2 seeds. Validation and test disagree on the best value, so the split decides."""
    val = {("flexkd", 0.1): (0.70, 0.72), ("flexkd", 0.5): (0.80, 0.78), ("flexkd", 2.0): (0.75, 0.75),
           ("projection", 0.5): (0.60, 0.64), ("projection", 1.0): (0.64, 0.60)}
    test = {("flexkd", 0.1): 0.90, ("flexkd", 0.5): 0.70, ("flexkd", 2.0): 0.71,
            ("projection", 0.5): 0.60, ("projection", 1.0): 0.50}
    for (strategy, beta), scores in val.items():
        for seed, v in enumerate(scores):
            write_run(root, strategy, seed, test[(strategy, beta)] + seed / 100, v, beta=beta, **kw)


def test_validation_split_chooses_each_strategys_beta(tmp_path):
    beta_sweep(tmp_path)
    summary = tables.main([str(tmp_path), "--split", "validation", "--no-plots"])
    (table,) = summary["tables"]
    rows = {r["variant"]: r for r in table["rows"]}
    # Rows are the validation means: flexkd at its default beta 0.5 is (0.80 + 0.78) / 2.
    assert rows["flexkd"]["mean"] == pytest.approx(0.79)
    assert rows["flexkd[beta=0.1]"]["mean"] == pytest.approx(0.71)
    assert rows["flexkd"]["teacher"] == pytest.approx(0.8)
    best = summary["best_on_validation"]
    assert set(best) == {"flexkd", "projection"}
    assert best["flexkd"]["knob"] == "beta" and best["flexkd"]["value"] == 0.5
    assert best["flexkd"]["variant"] == "flexkd" and best["flexkd"]["mean"] == pytest.approx(0.79)
    # t-interval over 2 seeds: 0.79 +- 12.7062 * 0.014142 / sqrt(2)
    half = 12.706205 * math.sqrt(0.0002) / math.sqrt(2)
    assert best["flexkd"]["ci"] == pytest.approx([0.79 - half, 0.79 + half], abs=1e-5)
    assert best["flexkd"]["candidates"] == pytest.approx({"0.1": 0.71, "0.5": 0.79, "2.0": 0.75})
    # projection 0.5 and 1.0 both average 0.62 on validation: the tie goes to the smaller beta.
    assert best["projection"]["value"] == 0.5 and best["projection"]["mean"] == pytest.approx(0.62)
    assert best["flexkd"]["pair"] == "p" and best["flexkd"]["task"] == "t"
    saved = json.loads((tmp_path / "summary.validation.json").read_text())
    assert saved["split"] == "validation" and saved["best_on_validation"]["flexkd"]["value"] == 0.5
    assert saved["tables"][0]["best_on_validation"]["projection"]["value"] == 0.5
    md = (tmp_path / "table.validation.md").read_text()
    assert "### p / t: accuracy on validation" in md
    assert "chosen on validation: flexkd beta=0.5 (accuracy 0.7900" in md
    assert "chosen on validation: projection beta=0.5" in md

    # The default split is test: other means, and no choice (that would tune on the test set).
    summary = tables.main([str(tmp_path), "--no-plots"])
    rows = {r["variant"]: r for r in summary["tables"][0]["rows"]}
    assert rows["flexkd[beta=0.1]"]["mean"] == pytest.approx(0.905)
    assert "best_on_validation" not in summary and summary["split"] == "test"
    assert "chosen on validation" not in (tmp_path / "table.md").read_text()
    # ... written beside the validation files, which it leaves as they were.
    assert (tmp_path / "table.validation.md").read_text() == md
    assert json.loads((tmp_path / "summary.validation.json").read_text()) == saved
    assert json.loads((tmp_path / "summary.json").read_text())["split"] == "test"


def test_lower_is_better_metric_takes_the_smallest_mean(tmp_path):
    for seed in (0, 1):
        for beta, ppl in ((0.1, 30.0), (1.0, 20.0), (2.0, 25.0)):
            write_run(tmp_path, "projection", seed, ppl, ppl + seed, metric="perplexity", beta=beta)
    summary = tables.main([str(tmp_path), "--split", "validation", "--no-plots"])
    best = summary["best_on_validation"]["projection"]
    assert (best["value"], best["mean"], best["higher_is_better"]) == (1.0, 20.5, False)
    assert ("lowest mean among 0.1: 30.5000, 1.0: 20.5000, 2.0: 25.5000"
            in (tmp_path / "table.validation.md").read_text())


def test_no_choice_unless_one_numeric_knob_varies(tmp_path):
    # flexkd varies beta and score: two knobs at once, no single one to choose.
    write_run(tmp_path, "flexkd", 0, 0.5, 0.7, beta=0.1)
    write_run(tmp_path, "flexkd", 0, 0.5, 0.8, beta=0.1, score="random")
    write_run(tmp_path, "flexkd", 0, 0.5, 0.6, beta=2.0, score="fisher")
    # projection at one beta only: nothing was swept.
    write_run(tmp_path, "projection", 0, 0.5, 0.7)
    summary = tables.main([str(tmp_path), "--split", "validation", "--no-plots"])
    assert summary["best_on_validation"] == {}
    # A non-numeric knob (score) is not a value to choose either.
    table = {"metric": "accuracy", "rows": [
        {"strategy": "flexkd", "variant": v, "coords": {"score": s}, "mean": m, "n_seeds": 1,
         "ci95": [math.nan, math.nan]} for v, s, m in (("a", "grad", 0.5), ("b", "random", 0.6))]}
    assert validation_choice.best_on_validation(table) == {}


def test_a_metric_missing_on_the_validation_split_is_a_one_line_error(tmp_path):
    write_run(tmp_path, "projection", 0, 0.5, 0.7)
    with pytest.raises(SystemExit, match=r"no run records rougeL on the validation split; "
                                         r"pass --metric with one it records \(accuracy\)"):
        tables.main([str(tmp_path), "--split", "validation", "--metric", "rougeL", "--no-plots"])


def test_wandb_report_logs_table_numbers_and_plots_offline(tmp_path, wandb_env, monkeypatch):  # noqa: F811
    """Runs made with logger=wandb: tables logs one report run by itself (no --wandb), into
    the runs' project; runs without a Hydra dir group by the table's dir, relative to the cwd."""
    import wandb

    monkeypatch.chdir(tmp_path)
    sweep = tmp_path / "sweep"
    logger = {"name": "wandb", "project": "flexkd-report-test", "entity": None, "group": None,
              "mode": None, "tags": ["paper"]}
    beta_sweep(sweep, logger=logger)
    summary = tables.main([str(sweep), "--split", "validation"])
    wandb.teardown()  # waits until the offline .wandb file is flushed
    (run_dir,) = (sweep / "wandb").glob("offline-run-*")
    wb = read_offline_run(run_dir)
    assert wb["run"].project == "flexkd-report-test" and wb["run"].run_group == "sweep"
    assert wb["run"].job_type == "tables" and list(wb["run"].tags) == ["tables", "split:validation", "paper"]
    logged = wb["summary"]
    assert logged["best_on_validation/flexkd/value"] == 0.5
    assert logged["best_on_validation/flexkd/knob"] == "beta"
    assert logged["best_on_validation/flexkd/mean"] == summary["best_on_validation"]["flexkd"]["mean"]
    assert logged["p/t/accuracy/flexkd[beta=0.1]/mean"] == pytest.approx(0.71)
    assert logged["p/t/accuracy/flexkd[beta=0.1]/n_seeds"] == 2

    # The table: one row per variant, as in table.md; NaN cells (no reference) are empty.
    assert logged["table"]["_type"] == "table-file" and logged["table"]["nrows"] == 5
    (table_file,) = (run_dir / "files" / "media" / "table").glob("*.table.json")
    table = json.loads(table_file.read_text())
    assert table["columns"] == wandb_report.TABLE_COLUMNS
    by_variant = {row[4]: dict(zip(table["columns"], row, strict=True)) for row in table["data"]}
    assert sorted(by_variant) == sorted(r["variant"] for r in summary["tables"][0]["rows"])
    assert by_variant["flexkd"]["mean"] == pytest.approx(0.79) and by_variant["flexkd"]["p_value"] is None
    assert logged["table_md"]["_type"] == "html-file"

    # Every plot file: PNGs as images (the same bytes), SVGs as HTML.
    pngs = [p for p in summary["plots"] if p.endswith(".png")]
    assert pngs and len(pngs) == len(summary["plots"]) / 2
    assert all(".validation." in name for name in summary["plots"]), summary["plots"]
    for name in summary["plots"]:
        entry = logged[wandb_report.plot_key(name)]
        if name.endswith(".png"):
            assert entry["_type"] == "image-file"
            assert (run_dir / "files" / entry["path"]).read_bytes() == (sweep / name).read_bytes()
        else:
            assert entry["_type"] == "html-file"
            assert b"<svg" in (run_dir / "files" / entry["path"]).read_bytes()[:4000]


def test_csv_runs_log_to_wandb_only_when_asked(tmp_path, wandb_env, monkeypatch):  # noqa: F811
    import wandb

    sweep = tmp_path / "csv-sweep"
    beta_sweep(sweep)
    tables.main([str(sweep), "--no-plots"])
    assert not (sweep / "wandb").exists()
    monkeypatch.chdir(tmp_path)
    tables.main([str(sweep), "--no-plots", "--wandb"])
    wandb.teardown()
    (run_dir,) = (sweep / "wandb").glob("offline-run-*")
    wb = read_offline_run(run_dir)
    # W&B's defaults of conf/logger/wandb.yaml; the group is the table's dir (no Hydra job dir).
    assert (wb["run"].project, wb["run"].run_group) == ("flexkd", "csv-sweep")
    assert wb["summary"]["split"] == "test" and "table" in wb["summary"]
    assert not any(k.startswith("plots") for k in wb["summary"])
    assert wandb_report.plot_key("p_t_accuracy.sweep-beta.png") == "plots/p_t_accuracy/sweep-beta"
    assert wandb_report.plot_key("t_rougeL.width-ratio.svg") == "plots_svg/t_rougeL/width-ratio"


def test_disabled_wandb_logs_no_report(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    beta_sweep(tmp_path, logger={"name": "wandb", "mode": None})
    tables.main([str(tmp_path), "--no-plots"])
    assert not (tmp_path / "wandb").exists()
