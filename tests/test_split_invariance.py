"""One optimizer step's gradient does not depend on how its batch is split (issue 10, item 3):
batch 32 == 2 accumulated micro-batches of 16 == 2 DDP ranks of 16, for every row-mean term (task
CE, logit KD, token-level MSE). The micro-batches here hold different numbers of rows, which is
where the old mean of micro-batch means goes wrong; each test shows that it would."""

import os
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from omegaconf import OmegaConf

from flexkd.data.datamodule import DistillDataModule
from flexkd.data.step_units import DIVISOR, StepUnitsBatchSampler
from flexkd.data.tasks import TaskSpec
from flexkd.models import build_model, load_tokenizer
from flexkd.module import DistillationModule
from flexkd.sources import resolve_source
from flexkd.step import LiveTeacher, distill_terms, normalise_to_step
from flexkd.strategies import SetupContext, build_strategy

CONF = Path(__file__).resolve().parents[1] / "conf"
RTOL = 1e-6  # relative to the gradient's norm, fp32


def task_spec(task: str, max_train: int) -> TaskSpec:
    cfg = OmegaConf.load(CONF / "task" / f"{task}.yaml")
    cfg.max_train_examples = max_train
    return TaskSpec.from_config(cfg, resolve_source)


def setup_pair(pair: str, task: str, name: str, batch_size: int, accumulate: int = 1,
               max_train: int = 32):
    """(teacher, student, strategy, datamodule) of a tiny pair, models fixed by their seeds."""
    spec = task_spec(task, max_train)
    pair_cfg = OmegaConf.to_container(OmegaConf.load(CONF / "pair" / f"{pair}.yaml"))
    tok = load_tokenizer(pair_cfg["student"], resolve_source)
    label_words = pair_cfg.get("classify_with") == "label_words"
    models = [build_model(pair_cfg[side], spec.format, tok, spec.label_names, resolve_source, seed=seed,
                          label_words=label_words).eval()  # no dropout: equal gradients
              for side, seed in (("teacher", 0), ("student", 1))]
    data = datamodule(spec, tok, batch_size, accumulate, label_words)
    torch.manual_seed(2)  # a projector's init
    strategy = build_strategy(name, **({"beta": 1.0} if name == "projection" else {}))
    strategy.setup(SetupContext(teacher=models[0], student=models[1], datamodule=data))
    return (*models, strategy, data)


def datamodule(spec, tok, batch_size, accumulate, label_words=False) -> DistillDataModule:
    # Unbucketed, so that a batch of 32 holds the same examples as the first two of 16.
    data = DistillDataModule(spec, tok, batch_size=batch_size, seed=1, bucket_by_length=False,
                             label_words=label_words)
    data.trainer = SimpleNamespace(accumulate_grad_batches=accumulate)  # what a Trainer sets
    return data


def parameters(student, strategy):
    return [*student.named_parameters(), *(("strategy." + n, p) for n, p in strategy.named_parameters())]


def step_gradient(student, strategy, teacher, batches, accumulate, mean_of_means=False) -> torch.Tensor:
    """The summed gradient of one optimizer step over `batches`, each loss divided by
    `accumulate` as Lightning does; with `mean_of_means`, the old per-micro-batch means."""
    params = parameters(student, strategy)
    for _, p in params:
        p.grad = None
    for batch in batches:
        terms = distill_terms(strategy, student, batch, LiveTeacher(teacher, strategy))
        if not mean_of_means:
            terms = normalise_to_step(terms, batch, strategy.additive_terms())
        (sum(terms.values()) / accumulate).backward()
    return torch.cat([p.grad.flatten() for _, p in params])


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


CASES = [("tiny_causal", "tiny_instruct", "sft", 32), ("tiny_causal", "tiny_instruct", "logit_kd", 32),
         ("tiny_encoder", "tiny_cls", "sft", 24), ("tiny_encoder", "tiny_cls", "logit_kd", 24),
         ("tiny_encoder", "tiny_cls", "projection", 24)]


@pytest.mark.parametrize("pair,task,name,max_train", CASES)
def test_accumulating_two_batches_of_16_equals_one_batch_of_32(pair, task, name, max_train):
    teacher, student, strategy, whole = setup_pair(pair, task, name, 32, max_train=max_train)
    halves = datamodule(whole.task, whole.tokenizers["student"], 16, 2, whole.label_words)
    one = next(iter(whole.train_dataloader()))
    two = list(iter(halves.train_dataloader()))[:2]
    assert sorted(torch.cat([b["index"] for b in two]).tolist()) == sorted(one["index"].tolist())
    # The micro-batches differ in rows (response tokens; 16 and 8 of the 24 classified examples).
    assert two[0]["units"]["task"] != two[1]["units"]["task"]
    assert two[0]["step_units"] == two[1]["step_units"] == {**one["units"], DIVISOR: 2}

    reference = step_gradient(student, strategy, teacher, [one], 1)
    assert relative(step_gradient(student, strategy, teacher, two, 2), reference) < RTOL
    assert relative(step_gradient(student, strategy, teacher, two, 2, mean_of_means=True), reference) > 1e-3


def test_batch_statistic_feature_losses_are_not_normalised_by_the_step():
    """corr and CKA z-score / centre over the micro-batch's tokens: not sums over rows."""
    assert "feature" not in build_strategy("flexkd").additive_terms()  # corr
    assert "feature" not in build_strategy("cka").additive_terms()
    assert "feature" in build_strategy("flexkd", feature_loss="mse").additive_terms()
    assert "feature" in build_strategy("raw").additive_terms()
    terms = {"task": torch.tensor(2.0), "feature": torch.tensor(3.0)}
    batch = {"units": {"task": 5, "feature": 40}, "step_units": {"task": 20, "feature": 90, DIVISOR: 4}}
    out = normalise_to_step(terms, batch, frozenset({"task"}))
    assert out["task"].item() == 2.0 * 5 / 20 * 4 and out["feature"].item() == 3.0


def test_the_step_units_cover_every_rank_and_micro_batch_of_the_step():
    """3 ranks x accumulate 2 of 5 examples each (batch 5, 37 examples): step 0 holds global
    batches 0..5, step 1 holds 6, 7 and the wrapped-around 0 (rank 2's second batch there)."""
    units = [{"task": i} for i in range(37)]
    samplers = [StepUnitsBatchSampler(units, 2, 5, seed=3, rank=r, world_size=3) for r in range(3)]
    batches = samplers[0].batches(0)
    per_rank = [list(s) for s in samplers]
    assert [len(b) for b in per_rank] == [3, 3, 3]
    for k, step_batches in ((0, range(6)), (2, (6, 7, 0))):
        expected = sum(i for p in step_batches for i in batches[p])
        for rank_batches in per_rank:
            assert rank_batches[k][0][1] == {"task": expected, DIVISOR: 6}
    seen = [i for rank_batches in per_rank for k in range(2) for i, _ in rank_batches[k]]
    assert sorted(seen) == sorted(i for p in range(6) for i in batches[p])
    # A resume in the middle of step 0 still counts the whole step.
    samplers[1].fast_forward(1)
    assert list(samplers[1]) == per_rank[1][1:]


class GradientAtStep(L.Callback):
    """The summed gradient Lightning hands the optimizer (before clipping and the update)."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.gradient = torch.cat([p.grad.flatten().clone() for p in pl_module.student.parameters()])


def trainer_gradient(batch_size: int, accumulate: int) -> torch.Tensor:
    teacher, student, strategy, data = setup_pair("tiny_causal", "tiny_instruct", "logit_kd", batch_size)
    capture = GradientAtStep()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, accumulate_grad_batches=accumulate,
                        precision="32-true", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, use_distributed_sampler=False, callbacks=[capture])
    student.train()  # as in a run (the tiny Llama has no dropout)
    trainer.fit(DistillationModule(student, strategy, teacher=teacher), datamodule=data)
    assert data.trainer is trainer  # so the loader's step units used its accumulate_grad_batches
    return capture.gradient


def test_lightning_accumulate_grad_batches_2_at_16_equals_batch_32():
    assert relative(trainer_gradient(16, 2), trainer_gradient(32, 1)) < RTOL


def _ddp_rank(rank: int, world_size: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        teacher, student, strategy, data = setup_pair("tiny_causal", "tiny_instruct", "logit_kd", 16)
        batch = next(iter(data.train_dataloader()))  # the sampler shards by the process group
        ddp = torch.nn.parallel.DistributedDataParallel(student)
        terms = distill_terms(strategy, ddp, batch, LiveTeacher(teacher, strategy))
        sum(normalise_to_step(terms, batch, strategy.additive_terms()).values()).backward()
        if rank == 0:
            torch.save({"gradient": torch.cat([p.grad.flatten() for p in student.parameters()]),
                        "units": batch["units"], "step_units": batch["step_units"]}, out)
        # Both ranks tear down together and the DDP reducer goes first: in one fresh-clone CI
        # run rank 1 exited while rank 0 hung for 15 min in teardown (futex wait, rank0.pt
        # already written).
        del ddp
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_ddp_processes_of_16_equal_one_process_of_32(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "rank0.pt"
    # spawn, not fork: under pytest-xdist the worker runs execnet threads, and a forked child of a
    # threaded process can inherit a held lock (one fresh-clone run hung here). Costs an import.
    ranks = mp.start_processes(_ddp_rank, args=(2, port, str(out)), nprocs=2, join=False,
                               start_method="spawn")
    deadline = time.monotonic() + 300  # a hang fails here, not at pytest's 20-minute timeout
    while not ranks.join(timeout=5):
        if time.monotonic() > deadline:
            for process in ranks.processes:
                process.kill()
            pytest.fail("the two DDP ranks did not finish within 300 s")
    ranked = torch.load(out)
    teacher, student, strategy, data = setup_pair("tiny_causal", "tiny_instruct", "logit_kd", 32)
    one = next(iter(data.train_dataloader()))
    assert ranked["step_units"] == {**one["units"], DIVISOR: 2}
    assert ranked["units"]["task"] != one["units"]["task"] / 2  # the ranks' halves differ in tokens
    assert relative(ranked["gradient"], step_gradient(student, strategy, teacher, [one], 1)) < RTOL
