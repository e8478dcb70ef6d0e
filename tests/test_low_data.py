"""The low-data setting (data.train_fraction): the student's train split is one fixed subset for
every strategy and run seed; the teacher stays the full-data one; caches that read the subset
are keyed by it, and f = 1.0 changes no key; tables pair each fraction with sft at that fraction."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from benchmarks import plots, tables
from flexkd.data.datamodule import DistillDataModule
from flexkd.data.jsonl import read_jsonl
from flexkd.data.subset import subset_indices, subset_size
from flexkd.data.tasks import SPLITS, TaskSpec
from flexkd.errors import ConfigError
from flexkd.models import load_tokenizer
from flexkd.sources import resolve_source
from flexkd.storage import file_sha256
from flexkd.validation import check_schema
from tests.conftest import ROOT
from tests.test_tables import write_run

CONF = ROOT / "conf"
N_TRAIN = 512  # rows of the tiny_cls fixture's train split
F_68 = 0.133  # round(0.133 * 512) = round(68.1) = 68 examples: 3 batches of 32 an epoch


def compose_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=["pair=tiny_encoder", "task=tiny_cls", *overrides])


def tiny_task() -> TaskSpec:
    return TaskSpec.from_config(compose_cfg().task, resolve_source)


def module(task: TaskSpec, seed: int = 0) -> DistillDataModule:
    tok = load_tokenizer(dict(compose_cfg().pair.student), resolve_source)
    data = DistillDataModule(task, tok, batch_size=32, seed=seed)
    data.setup()
    return data


# ----------------------------------------------------------------------------- the subset

def test_subset_size_and_draw():
    assert [subset_size(N_TRAIN, f) for f in (F_68, 0.01, 0.05, 0.2, 1.0)] == [68, 5, 26, 102, 512]
    assert subset_size(10, 0.01) == 1  # never empty: max(1, round(0.1)) = 1
    picked = subset_indices(N_TRAIN, F_68, seed=0)
    assert len(picked) == len(set(picked)) == 68
    assert picked == sorted(picked) and 0 <= picked[0] and picked[-1] < N_TRAIN
    assert subset_indices(N_TRAIN, F_68, seed=0) == picked  # a pure function of its arguments
    assert subset_indices(N_TRAIN, F_68, seed=1) != picked
    # Nested: one seed's 5% holds its 1%.
    assert set(subset_indices(N_TRAIN, 0.01, 0)) <= set(subset_indices(N_TRAIN, 0.05, 0))
    assert subset_indices(N_TRAIN, 1.0, seed=5) == list(range(N_TRAIN))


def test_train_split_is_the_same_subset_for_every_run_seed_and_only_train_is_cut():
    full = tiny_task()
    rows = read_jsonl(full.split_path("train"), ("text", "label"))
    task = full.with_train_subset(F_68, 0)
    a, b = module(task, seed=0), module(task, seed=7)
    # Each example records the file line it came from.
    expected = [f"{full.split_path('train')}:{rows[i]['_line']}"
                for i in subset_indices(N_TRAIN, F_68, 0)]
    for data in (a, b):
        train = data.splits["train"]
        assert [e["where"] for e in train] == expected
        # Indexed by position in the subset: the teacher store's rows are these.
        assert [e["index"] for e in train] == list(range(68))
        assert data.available["train"] == N_TRAIN
    whole = module(full)
    for split in ("validation", "test"):
        assert [e["where"] for e in a.splits[split]] == [e["where"] for e in whole.splits[split]]
        assert len(a.splits[split]) == 128  # the fixture's whole split
    other = module(full.with_train_subset(F_68, 1)).splits["train"]
    assert len(other) == 68 and [e["where"] for e in other] != expected
    # The run seed orders batches, never picks examples: 3 batches an epoch for both seeds.
    assert len(a.train_dataloader()) == len(b.train_dataloader()) == 3


def test_max_train_examples_is_applied_before_the_fraction():
    cfg = compose_cfg("task.max_train_examples=100")
    task = TaskSpec.from_config(cfg.task, resolve_source).with_train_subset(0.25, 0)
    data = module(task)
    assert data.available["train"] == 100 and len(data.splits["train"]) == 25


# ----------------------------------------------------------------------------- cache keys

def test_fraction_one_keeps_the_fingerprint_and_a_subset_changes_it():
    task = tiny_task()
    old_keys = {"name", "format", "files", "labels", "max_length", "max_prompt_words",
                "max_examples"}
    fingerprint = task.fingerprint()
    assert set(fingerprint) == old_keys  # exactly what it was before train_fraction existed
    assert fingerprint["files"] == {s: file_sha256(task.split_path(s)) for s in SPLITS}
    for seed in (0, 3):  # the subset seed is irrelevant when nothing is cut
        assert task.with_train_subset(1.0, seed).fingerprint() == fingerprint
    small = task.with_train_subset(0.05, 0).fingerprint()
    assert small == fingerprint | {"train_subset": {"fraction": 0.05, "seed": 0}}
    assert task.with_train_subset(0.05, 1).fingerprint() != small
    assert task.with_train_subset(0.2, 0).fingerprint() != small


def test_a_fraction_outside_0_1_is_one_line_naming_the_range():
    for value in ("0", "1.5", "-0.2"):
        with pytest.raises(ConfigError) as err:
            check_schema(compose_cfg(f"data.train_fraction={value}"))
        message = str(err.value)
        assert message.startswith(f"data.train_fraction={value} is out of range")
        assert "(0, 1]" in message and "\n" not in message
    with pytest.raises(ConfigError, match=r"outside \(0, 1\]") as err:
        tiny_task().with_train_subset(0.0, 0)
    assert "\n" not in str(err.value)
    check_schema(compose_cfg("data.train_fraction=0.01", "data.subset_seed=4"))


# ----------------------------------------------------------------------------- through run.py

LOW = ("pair=tiny_encoder", "task=tiny_cls", "strategy=flexkd", "teacher_store=auto",
       "data.batch_size=32", "trainer.max_steps=8", "strategy.probe_examples=32")


@pytest.mark.slow
def test_a_small_fraction_trains_max_steps_over_several_epochs_on_the_full_data_teacher(run_cli):
    low = run_cli(*LOW, f"data.train_fraction={F_68}", name="low").results()
    full = run_cli(*LOW, name="full").results()
    # 68 examples, 3 batches an epoch: 8 steps take 3 epochs.
    assert low["train"]["steps"] == full["train"]["steps"] == 8
    assert low["data"] == {"train_examples": 68, "train_examples_available": N_TRAIN,
                           "train_fraction": F_68, "subset_seed": 0}
    assert full["data"]["train_examples"] == N_TRAIN and full["data"]["train_fraction"] == 1.0
    # One teacher for both (its key ignores the fraction); the probe and the store read the data
    # the student sees, so theirs differ.
    assert low["teacher"]["key"] == full["teacher"]["key"]
    assert low["teacher"]["path"] == full["teacher"]["path"]
    assert low["probe"]["probes"][0]["key"] != full["probe"]["probes"][0]["key"]
    assert low["teacher_store"]["enabled"] and full["teacher_store"]["enabled"]
    assert low["teacher_store"]["key"] != full["teacher_store"]["key"]
    assert low["config"]["data"]["train_fraction"] == F_68


def test_every_epoch_reshuffles_and_loaders_leave_the_global_rng_alone():
    """Lightning sets the epoch on a loader's `sampler` and its batch sampler's `sampler` only;
    the loaders' iterators must not draw from the global RNG (dropout's), or a run resumed at an
    epoch's end would draw once less than an uninterrupted one."""
    import torch
    from lightning.fabric.utilities.data import _set_sampler_epoch

    loader = module(tiny_task().with_train_subset(F_68, 0)).train_dataloader()
    epochs = []
    for epoch in (0, 1):
        _set_sampler_epoch(loader, epoch)
        before = torch.get_rng_state()
        epochs.append([b["index"].tolist() for b in loader])
        assert torch.equal(torch.get_rng_state(), before)
    assert epochs == [loader.batch_sampler.batches(0), loader.batch_sampler.batches(1)]
    assert epochs[0] != epochs[1]
    assert sorted(i for b in epochs[1] for i in b) == list(range(68))


class Interrupted(Exception):
    pass


@pytest.mark.slow
@pytest.mark.parametrize("stop_at", [3, 4], ids=["at-an-epoch-end", "mid-epoch-1"])
def test_a_small_subset_run_interrupted_epochs_in_resumes_to_the_same_result(stop_at, tmp_path,
                                                                             cache_dir, monkeypatch):
    """68 examples, 3 batches an epoch, 9 steps: stopped right after the checkpoint at `stop_at`
    (the end of epoch 0, or one batch into epoch 1), the rerun ends where the uninterrupted
    run does, bit for bit."""
    from flexkd import checkpointing
    from flexkd.pipeline import run

    def cfg(out):
        return compose_cfg("strategy=projection", "data.batch_size=32", f"data.train_fraction={F_68}",
                           "trainer.max_steps=9", f"checkpoint.every_n_steps={stop_at}",
                           "trainer.deterministic=true", "teacher_finetune.max_steps=40",
                           "trainer.enable_progress_bar=false", "trainer.precision=32-true",
                           "save_student=false", f"cache_dir={cache_dir}", f"output_dir={out}")

    reference = run(cfg(tmp_path / "uninterrupted"))
    save = checkpointing.ResumeCheckpoint.save

    def save_then_stop(self, trainer):
        save(self, trainer)
        if trainer.global_step == stop_at:
            raise Interrupted

    monkeypatch.setattr(checkpointing.ResumeCheckpoint, "save", save_then_stop)
    with pytest.raises(Interrupted):
        run(cfg(tmp_path / "interrupted"))
    monkeypatch.undo()
    resumed = run(cfg(tmp_path / "interrupted"))
    assert resumed["train"]["resumed_from"].endswith("last.ckpt")
    assert resumed["train"]["steps"] == reference["train"]["steps"] == 9
    assert resumed["data"]["train_examples"] == 68
    assert resumed["metrics"]["student"] == reference["metrics"]["student"]
    assert resumed["metrics"]["validation"] == reference["metrics"]["validation"]


# ----------------------------------------------------------------------------- tables

def test_fraction_sweep_table_pairs_each_fraction_with_sft_at_that_fraction(tmp_path):
    accuracy = {("sft", 0.01): (0.60, 0.62), ("flexkd", 0.01): (0.65, 0.66),
                ("sft", 0.05): (0.70, 0.74), ("flexkd", 0.05): (0.71, 0.76)}
    for (strategy, fraction), scores in accuracy.items():
        for seed, acc in enumerate(scores):
            write_run(tmp_path, f"{strategy}-{fraction}-{seed}", strategy, seed, acc,
                      config={"data.train_fraction": fraction})
    summary = tables.main([str(tmp_path), "--no-plots"])
    (table,) = summary["tables"]
    rows = {r["variant"]: r for r in table["rows"]}
    assert sorted(rows) == ["flexkd {data.train_fraction=0.01}", "flexkd {data.train_fraction=0.05}",
                            "sft {data.train_fraction=0.01}", "sft {data.train_fraction=0.05}"]
    assert table["varying_config"] == ["data.train_fraction"]
    assert table["reference"] == "sft (matched on data.train_fraction)"
    for fraction, diffs in ((0.01, (0.05, 0.04)), (0.05, (0.01, 0.02))):
        vs = rows[f"flexkd {{data.train_fraction={fraction}}}"]["vs"]
        assert vs["reference"] == f"sft {{data.train_fraction={fraction}}}"
        assert vs["seeds"] == [0, 1] and vs["mean_diff"] == pytest.approx(sum(diffs) / 2)
        assert rows[f"sft {{data.train_fraction={fraction}}}"]["vs"] is None
    assert "Δ vs sft (matched on data.train_fraction)" in (tmp_path / "table.md").read_text()


def test_three_fraction_sweep_plots_a_line_per_strategy_with_its_difference_to_sft(tmp_path):
    for fraction, base in ((0.01, 0.60), (0.05, 0.70), (0.2, 0.80)):
        for seed in (0, 1, 2):
            write_run(tmp_path, f"s-{fraction}-{seed}", "sft", seed, base + seed / 100,
                      config={"data.train_fraction": fraction})
            write_run(tmp_path, f"f-{fraction}-{seed}", "flexkd", seed, base + 0.03 + seed / 50,
                      config={"data.train_fraction": fraction})
    summary = tables.main([str(tmp_path)])
    sweeps = plots.numeric_sweeps(summary["tables"][0]["rows"])
    assert [s["label"] for s in sweeps["data.train_fraction"]] == ["flexkd", "sft"]
    flexkd = sweeps["data.train_fraction"][0]["points"]
    # flexkd - sft at each fraction on seeds 0, 1, 2: 0.03 + s/100, mean 0.04 at every fraction.
    assert [(x, round(r["vs"]["mean_diff"], 10)) for x, r in sorted(flexkd, key=lambda p: p[0])] == [
        (0.01, 0.04), (0.05, 0.04), (0.2, 0.04)]
    png = tmp_path / "p_t_accuracy.sweep-data.train_fraction.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "p_t_accuracy.sweep-data.train_fraction.svg" in summary["plots"]
