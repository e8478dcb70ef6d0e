"""The paper experiments compose, pair each pair with its task, and every job validates."""

import itertools
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from flexkd.sources import resolve_source
from flexkd.validation import check_schema, validate_config

CONF = Path(__file__).resolve().parents[1] / "conf"
WIDTH_ARMS = {"mpnet_r2": ("mpnet_w384", "rt_polarity", 768 / 384),
              "mpnet_r4": ("mpnet_w192", "rt_polarity", 768 / 192),
              "mpnet_r8": ("mpnet_w96", "rt_polarity", 768 / 96),
              "smollm2_r1_5": ("smollm2_w384", "bbc_headline", 576 / 384),
              "smollm2_r2": ("smollm2_w288", "bbc_headline", 576 / 288),
              "smollm2_r3": ("smollm2_w192", "bbc_headline", 576 / 192)}
TEACHER_WIDTH = {"mpnet": 768, "smollm2": 576}  # all-mpnet-base-v2, SmolLM2-135M-Instruct


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
    assert {s for _, s, _ in seen} == {"flexkd", "projection", "cka", "logit_kd", "sft"}
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


def test_each_arm_passes_full_validation_on_the_real_assets(cache_dir):
    """Model configs, the pruned shapes and tokenizers of the shipped assets (resolving an
    `asset:` source builds it into the session's cache, as a run would)."""
    resolve = lambda s: resolve_source(s, cache_dir)  # noqa: E731
    for arm in WIDTH_ARMS:
        validate_config(compose_job("experiment=paper_width_ratio", f"+width_arm={arm}"), resolve)
    validate_config(compose_job("experiment=paper_instruction", "+instruction_arm=seqkd"), resolve)
    cfg = compose_job("experiment=paper_instruction", "+instruction_arm=seqkd")
    assert OmegaConf.select(cfg, "pair.student.prune.rank_by") == "probe"


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
