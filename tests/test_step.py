"""The one distill step, the learning-rate schedule and the progress log."""

import logging
import math
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import SingleDeviceStrategy
from transformers import BertConfig, BertModel

from flexkd.errors import NonFiniteLossError
from flexkd.models import SequenceClassifier
from flexkd.module import DistillationModule
from flexkd.step import LiveTeacher, check_finite, distill_terms
from flexkd.strategies import SetupContext, build_strategy
from flexkd.strategies.base import Strategy
from flexkd.training import ProgressLog
from tests.test_strategies import ProbeData


def classifier(hidden, seed):
    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=2 * hidden, vocab_size=30, max_position_embeddings=16,
                     hidden_dropout_prob=0.5)  # a teacher left in train mode would show
    return SequenceClassifier(BertModel(cfg), 2)


def tiny_batch():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 30, (4, 6), generator=gen)
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[0, 4:] = 0
    side = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 0, 1])}
    return {"student": side, "teacher": side, "index": torch.arange(4)}


@pytest.mark.parametrize("name", ["flexkd", "projection", "cka", "logit_kd", None])
def test_step_terms_equal_calling_the_models_by_hand(name):
    teacher, student = classifier(16, 0), classifier(8, 1).eval()
    strategy = build_strategy(name, beta=1.0, gamma=0.5) if name else Strategy()
    strategy.setup(SetupContext(teacher=teacher, student=student, datamodule=ProbeData([tiny_batch()])))
    b = tiny_batch()

    teacher.train()  # as a trainer's .train() would leave it; the step must use eval mode
    terms = distill_terms(strategy, student, b, LiveTeacher(teacher, strategy))
    assert teacher.training is not strategy.needs_teacher  # asked only when needed

    request = strategy.teacher_request()
    with torch.no_grad():
        t_out = teacher.eval()(b["teacher"], layers=request.layers) if strategy.needs_teacher else None
    by_hand = strategy.losses(b, t_out, student(b["student"], layers=strategy.student_layers()))
    assert list(terms) == list(by_hand) and "task" in terms
    assert all(torch.equal(terms[k], by_hand[k]) for k in terms), (terms, by_hand)
    assert ("logit" in terms) == (name is not None)  # gamma > 0 everywhere but the base class


def test_teacher_is_not_asked_when_the_strategy_does_not_need_it():
    student = classifier(8, 1).eval()
    terms = distill_terms(Strategy(), student, tiny_batch(), None)
    assert list(terms) == ["task"] and torch.equal(terms["task"], student(tiny_batch()["student"]).loss)
    strategy = build_strategy("logit_kd", gamma=1.0)
    with pytest.raises(ValueError, match="'logit_kd' needs teacher outputs"):
        distill_terms(strategy, student, tiny_batch(), None)


def test_teacher_outputs_carry_no_gradient_and_any_callable_can_stand_in():
    teacher, student = classifier(16, 0), classifier(8, 1).eval()
    strategy = build_strategy("logit_kd", gamma=1.0, alpha=0.0)
    strategy.setup(SetupContext(teacher=teacher, student=student, datamodule=ProbeData([tiny_batch()])))
    live = LiveTeacher(teacher, strategy)
    stored = live(tiny_batch())
    assert not stored.kd_logits.requires_grad
    asked = []
    terms = distill_terms(strategy, student, tiny_batch(), lambda b: asked.append(b) or stored)
    assert len(asked) == 1
    assert torch.equal(terms["logit"], distill_terms(strategy, student, tiny_batch(), live)["logit"])


def test_non_finite_term_names_itself_and_the_step():
    check_finite({"task": torch.tensor(0.5)}, 3)
    with pytest.raises(NonFiniteLossError, match=r"loss term 'logit' is nan at step 7; the last good"):
        check_finite({"task": torch.tensor(0.5), "logit": torch.tensor(math.nan)}, 7)
    with pytest.raises(NonFiniteLossError, match=r"'feat' is inf at step 0"):
        check_finite({"feat": torch.tensor(math.inf)}, 0)


def test_schedule_warms_up_to_lr_then_decays_by_cosine_to_a_tenth():
    lr, total = 1e-3, 20
    module = DistillationModule(classifier(8, 1), Strategy(), lr=lr, warmup_ratio=0.1)
    module._trainer = SimpleNamespace(  # what configure_optimizers reads of a Trainer
        estimated_stepping_batches=total, precision_plugin=Precision(), gradient_clip_val=1.0,
        strategy=SingleDeviceStrategy(torch.device("cpu")))
    scheduler = module.configure_optimizers()["lr_scheduler"]["scheduler"]
    lrs = [scheduler.get_last_lr()[0]]  # lrs[s]: the learning rate of optimizer step s
    for _ in range(total):
        scheduler.optimizer.step()
        scheduler.step()
        lrs.append(scheduler.get_last_lr()[0])
    # warmup = int(20 * 0.1) = 2 steps: 0, lr/2, then lr at the warmup's end.
    assert lrs[0] == 0.0 and lrs[1] == pytest.approx(lr / 2) and lrs[2] == pytest.approx(lr)
    # After warmup: 0.1 + 0.9 * (1 + cos(pi * (s - 2) / 18)) / 2, the former hand-written
    # formula; at s = 8, 11, 14 the cosine is 1/2, 0, -1/2.
    assert lrs[8] == pytest.approx(lr * (0.1 + 0.9 * 0.75))
    assert lrs[11] == pytest.approx(lr * 0.55)
    assert lrs[14] == pytest.approx(lr * (0.1 + 0.9 * 0.25))
    assert lrs[total] == pytest.approx(0.1 * lr)
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:], strict=False))


def fake_trainer(total):
    return SimpleNamespace(estimated_stepping_batches=total, global_step=0, is_global_zero=True,
                           callback_metrics={"train/loss": torch.tensor(0.25)})


def run_progress(callback, trainer, steps, micro_batches=1):
    callback.on_train_start(trainer, None)
    for step in range(1, steps + 1):
        for _ in range(micro_batches):  # gradient accumulation: batch_end without a new step
            callback.on_train_batch_end(trainer, None, None, None, 0)
        trainer.global_step = step
        callback.on_train_batch_end(trainer, None, None, None, 0)


def test_progress_is_logged_every_tenth_of_the_steps(caplog):
    with caplog.at_level(logging.INFO, logger="flexkd.training"):
        run_progress(ProgressLog("distill", seconds=1e9), fake_trainer(40), 40, micro_batches=2)
    steps = [int(r.getMessage().split("step ")[1].split("/")[0]) for r in caplog.records]
    assert steps == [4, 8, 12, 16, 20, 24, 28, 32, 36, 40]
    assert caplog.records[-1].getMessage().startswith("distill: step 40/40, loss 0.2500, elapsed 0m")
    assert caplog.records[-1].getMessage().endswith("eta 0m00s")


def test_progress_is_logged_every_few_seconds_on_slow_runs(caplog):
    with caplog.at_level(logging.INFO, logger="flexkd.training"):
        run_progress(ProgressLog("teacher", seconds=0.0), fake_trainer(1000), 7)
    assert len(caplog.records) == 7  # every step is "30 s later" when the period is 0
