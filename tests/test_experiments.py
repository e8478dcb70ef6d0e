"""The paper experiments compose, pair each pair with its task, and every job validates; a beta sweep
is chosen on the validation split (benchmarks.tables --split validation)."""

import itertools
import json
import statistics
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import flexkd.cli  # noqa: F401  (the config's resolvers, for resolve=True)
from benchmarks.tables import flatten
from flexkd.importance import SCORES
from flexkd.sources import resolve_source
from flexkd.strategies import build_strategy, variant_of
from flexkd.strategies.flexkd import FEATURE_LOSSES
from flexkd.validation import check_schema, validate_config
from tests.test_wandb_logging import read_offline_run, wandb_env  # noqa: F401 - a fixture

CONF = Path(__file__).resolve().parents[1] / "conf"
WIDTH_ARMS = {"mpnet_r2": ("mpnet_w384", "rt_polarity", 768 / 384),
              "mpnet_r4": ("mpnet_w192", "rt_polarity", 768 / 192),
              "mpnet_r8": ("mpnet_w96", "rt_polarity", 768 / 96),
              "smollm2_r1_5": ("smollm2_w384", "bbc_headline", 576 / 384),
              "smollm2_r2": ("smollm2_w288", "bbc_headline", 576 / 288),
              "smollm2_r3": ("smollm2_w192", "bbc_headline", 576 / 192)}
TEACHER_WIDTH = {"mpnet": 768, "smollm2": 576}  # all-mpnet-base-v2, SmolLM2-135M-Instruct
STRATEGIES = {"flexkd", "projection", "cka", "logit_kd", "sft"}


def compose_job(*overrides, hydra=False):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra)


def jobs(experiment: str) -> list[tuple[str, ...]]:
    params = dict(compose_job(f"experiment={experiment}", hydra=True).hydra.sweeper.params)
    axes = [[f"{key}={value}" for value in str(values).split(",")] for key, values in params.items()]
    return [(f"experiment={experiment}", *job) for job in itertools.product(*axes)]


def test_width_ratio_sweep_covers_each_ratio_with_its_task_and_every_job_validates():
    all_jobs = jobs("paper_width_ratio")
    assert len(all_jobs) == 6 * 5 * 3
    seen = set()
    for job in all_jobs:
        cfg = compose_job(*job)
        check_schema(cfg)
        arm = next(o.split("=")[1] for o in job if o.startswith("+width_arm="))
        pair, task, ratio = WIDTH_ARMS[arm]
        assert (cfg.pair.name, cfg.task.name) == (pair, task)
        family = pair.split("_")[0]
        assert TEACHER_WIDTH[family] / cfg.pair.student.prune.hidden_size == ratio
        seen.add((arm, cfg.strategy.name, cfg.seed))
    assert {s for _, s, _ in seen} == STRATEGIES
    assert len(seen) == len(all_jobs)  # no two jobs alike


def test_instruction_sweep_has_both_kl_directions_and_seqkd():
    all_jobs = jobs("paper_instruction")
    variants = set()
    for job in all_jobs:
        cfg = compose_job(*job)
        check_schema(cfg)
        assert (cfg.pair.name, cfg.task.name, cfg.eval.sampling) == ("smollm2_w288", "bbc_headline", True)
        variants.add((cfg.strategy.name, cfg.strategy.get("divergence"), cfg.seed))
    names = {(n, d if n == "logit_kd" else None) for n, d, _ in variants}
    assert names == {("flexkd", None), ("projection", None), ("cka", None), ("logit_kd", "forward"),
                     ("logit_kd", "reverse"), ("seqkd", None), ("sft", None)}
    assert len(variants) == len(all_jobs) == 7 * 3


def test_smollm2_ratio_2_arm_trains_exactly_the_instruction_sweeps_students():
    """paper_width_ratio's smollm2_r2 jobs are paper_instruction's jobs of the same strategy
    and seed scored greedy: no training setting differs, so the instruction sweep's students,
    re-scored with `stage=eval eval=default`, are that arm's results (README "Pruned students")."""
    for strategy in sorted(STRATEGIES):
        width = flatten(OmegaConf.to_container(compose_job(
            "experiment=paper_width_ratio", "+width_arm=smollm2_r2", f"strategy={strategy}",
            "seed=2"), resolve=True))
        instruction = flatten(OmegaConf.to_container(compose_job(
            "experiment=paper_instruction", f"+instruction_arm={strategy}", "seed=2"),
            resolve=True))
        differing = {k: (width.get(k), instruction.get(k)) for k in width.keys() | instruction.keys()
                     if width.get(k) != instruction.get(k)}
        assert differing == {"eval.sampling": (False, True)}, strategy


def test_each_arm_passes_full_validation_on_the_real_assets(cache_dir):
    """Model configs, the pruned shapes and tokenizers of the shipped assets (resolving an
    `asset:` source builds it into the session's cache, as a run would)."""
    resolve = lambda s: resolve_source(s, cache_dir)  # noqa: E731
    for arm in WIDTH_ARMS:
        validate_config(compose_job("experiment=paper_width_ratio", f"+width_arm={arm}"), resolve)
    validate_config(compose_job("experiment=paper_instruction", "+instruction_arm=seqkd"), resolve)
    cfg = compose_job("experiment=paper_instruction", "+instruction_arm=seqkd")
    assert OmegaConf.select(cfg, "pair.student.prune.rank_by") == "probe"


# ----------------------------------------------------------------------------- issue 9

CLASS_ARMS = {  # arm: (task, max_steps, batch, max_length, max_test_examples)
    "rt_polarity": ("rt_polarity", 100, 32, 64, None),
    "imdb": ("imdb", 100, 16, 128, 1000),
    "bbc_topic": ("bbc_topic", 100, 16, 128, None),
}


def test_classification_sweep_pairs_each_task_with_its_budget_and_every_job_validates():
    all_jobs = jobs("paper_classification")
    assert len(all_jobs) == 3 * 5 * 3
    seen = set()
    for job in all_jobs:
        cfg = compose_job(*job)
        check_schema(cfg)
        arm = next(o.split("=")[1] for o in job if o.startswith("+class_arm="))
        task, steps, batch, max_length, max_test = CLASS_ARMS[arm]
        assert (cfg.pair.name, cfg.task.name) == ("mpnet_minilm", task)
        assert (cfg.trainer.max_steps, cfg.data.batch_size) == (steps, batch)
        assert (cfg.task.max_length, cfg.task.max_test_examples) == (max_length, max_test)
        seen.add((arm, cfg.strategy.name, cfg.seed))
    assert {s for _, s, _ in seen} == STRATEGIES
    assert len(seen) == len(all_jobs)


def ablation_labels(experiment: str) -> dict[str, set[int]]:
    """Each job's variant label (as results.json records it) -> the seeds that run it."""
    labels: dict[str, set[int]] = {}
    for job in jobs(experiment):
        cfg = compose_job(*job)
        check_schema(cfg)
        assert (cfg.pair.name, cfg.task.name, cfg.trainer.max_steps) == ("mpnet_minilm", "rt_polarity", 100)
        label = variant_of(OmegaConf.to_container(cfg.strategy, resolve=True))["label"]
        labels.setdefault(label, set()).add(int(cfg.seed))
    return labels


def test_score_ablation_gives_one_variant_per_score():
    # grad is flexkd's default score: its runs are the plain `flexkd` row.
    assert ablation_labels("paper_ablation_score") == {
        label: {0, 1, 2} for label in ("flexkd", "flexkd[score=grad_x_act]", "flexkd[score=fisher]",
                                       "flexkd[score=activation]", "flexkd[score=random]")}
    assert set(SCORES) == {"grad", "grad_x_act", "fisher", "activation", "random"}


def test_loss_ablation_gives_one_variant_per_feature_loss():
    assert ablation_labels("paper_ablation_loss") == {
        label: {0, 1, 2} for label in ("flexkd", "flexkd[feature_loss=corr_diag]",
                                       "flexkd[feature_loss=mse]", "flexkd[feature_loss=cosine]")}
    assert set(FEATURE_LOSSES) == {"corr", "corr_diag", "mse", "cosine"}


def test_beta_sweep_sets_the_feature_weight_of_each_feature_strategy():
    all_jobs = jobs("beta_sweep")
    assert len(all_jobs) == 3 * 5 * 3
    seen = set()
    for job in all_jobs:
        cfg = compose_job(*job)
        check_schema(cfg)
        assert (cfg.pair.name, cfg.task.name) == ("mpnet_minilm", "rt_polarity")
        strategy = build_strategy(OmegaConf.to_container(cfg.strategy, resolve=True))
        # The knob is the strategy's own beta: the loss weight the strategy object applies.
        assert strategy.beta == cfg.strategy.beta
        seen.add((cfg.strategy.name, strategy.beta, cfg.seed))
    assert len(seen) == len(all_jobs)
    assert {(s, b) for s, b, _ in seen} == {(s, b) for s in ("flexkd", "projection", "cka")
                                            for b in (0.1, 0.25, 0.5, 1.0, 2.0)}


def test_each_class_arm_passes_full_validation_on_the_real_assets(cache_dir):
    resolve = lambda s: resolve_source(s, cache_dir)  # noqa: E731
    for arm in CLASS_ARMS:
        validate_config(compose_job("experiment=paper_classification", f"+class_arm={arm}",
                                    f"cache_dir={cache_dir}"), resolve)


def validation_argmax(runs: list[dict], strategy: str, metric: str) -> float:
    """The beta with the best mean validation `metric` over seeds (ties: the smaller beta)."""
    by_beta: dict[float, list[float]] = {}
    for r in runs:
        if r["strategy"] == strategy:
            by_beta.setdefault(r["config"]["strategy"]["beta"],
                               []).append(r["metrics"]["validation"]["student"][metric])
    return min(by_beta, key=lambda b: (-statistics.fmean(by_beta[b]), b))


@pytest.mark.slow
def test_tiny_beta_sweep_is_chosen_on_validation_and_reported_to_wandb(
        run_cli, wandb_env, monkeypatch):  # noqa: F811 - the imported fixture
    import wandb

    from benchmarks import tables

    run = run_cli("logger=wandb", "pair=tiny_encoder", "task=tiny_cls", "strategy=flexkd",
                  "strategy.beta=0.1,2.0", "seed=0,1", multirun=True)
    runs = [json.loads(p.read_text()) for p in sorted(run.out_dir.glob("*/results.json"))]
    assert len(runs) == 4  # one strategy keeps it short; tests/test_validation_choice.py has several
    monkeypatch.chdir(run.out_dir.parent)  # the jobs' cwd: W&B groups are relative to it
    for metric in ("accuracy", "macro_f1"):
        summary = tables.main([str(run.out_dir), "--split", "validation", "--metric", metric])
        (table,) = summary["tables"]
        assert sorted(r["variant"] for r in table["rows"]) == ["flexkd[beta=0.1]", "flexkd[beta=2.0]"]
        for strategy in ("flexkd",):
            chosen = summary["best_on_validation"][strategy]
            assert chosen["knob"] == "beta"
            assert chosen["value"] == validation_argmax(runs, strategy, metric), (metric, strategy)
            assert chosen["variant"] == f"{strategy}[beta={chosen['value']}]"
            assert f"chosen on validation: {strategy} beta={chosen['value']} ({metric}" in (
                run.out_dir / "table.validation.md").read_text()
    wandb.teardown()
    # Made with logger=wandb: each tables call logged a report run into the jobs' group.
    job_groups = {read_offline_run(d)["run"].run_group for d in run.out_dir.glob("*/wandb/offline-run-*")}
    reports = [read_offline_run(d) for d in (run.out_dir / "wandb").glob("offline-run-*")]
    assert len(job_groups) == 1 and len(reports) == 2
    assert {r["run"].run_group for r in reports} == job_groups
    assert {r["summary"]["best_on_validation/flexkd/value"] for r in reports} <= {0.1, 2.0}


def test_low_data_sweep_crosses_three_fractions_with_three_strategies_and_seeds():
    all_jobs = jobs("paper_low_data")
    assert len(all_jobs) == 3 * 3 * 3
    seen = set()
    for job in all_jobs:
        cfg = compose_job(*job)
        check_schema(cfg)
        assert (cfg.pair.name, cfg.task.name, cfg.trainer.max_steps) == ("mpnet_minilm", "rt_polarity", 100)
        assert (cfg.teacher_store, cfg.data.subset_seed) == ("auto", 0)
        # The teacher is the full-data one `make run` builds: its settings are the defaults.
        assert cfg.teacher_finetune == compose_job().teacher_finetune
        seen.add((cfg.strategy.name, cfg.data.train_fraction, cfg.seed))
    assert {s for s, _, _ in seen} == {"flexkd", "projection", "sft"}
    assert {f for _, f, _ in seen} == {0.01, 0.05, 0.2}
    assert len(seen) == len(all_jobs)  # no two jobs alike
