"""The run lifecycle (DESIGN.md "Data flow"), one small function per stage.

    resolve -> teacher (fine-tune, cached) -> data -> student (pruned ones: probe the teacher,
    prune, cached) -> strategy setup (probe, cached)
    -> distill (Lightning) -> evaluate -> save student -> results.json
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
from omegaconf import DictConfig, OmegaConf

from flexkd.checkpointing import ResumeCheckpoint, exact_mid_epoch_resume
from flexkd.data.datamodule import DistillDataModule
from flexkd.data.tasks import TaskSpec
from flexkd.errors import ConfigError
from flexkd.evaluation.evaluate import evaluate_on_task, merge_samples
from flexkd.evaluation.harness_metrics import evaluate_model
from flexkd.evaluation.selection import checkpoint_selection, selection_summary
from flexkd.loggers import build_loggers, finish_loggers
from flexkd.models import (
    build_model,
    load_saved_model,
    load_tokenizer,
    save_model,
    total_parameters,
    trainable_parameters,
    uses_label_words,
)
from flexkd.reporting import environment, summary_table, write_results
from flexkd.sources import resolve_source
from flexkd.storage import default_cache_dir
from flexkd.strategies import SetupContext, build_strategy, variant_of
from flexkd.teacher import evaluate_teacher, prepare_teacher
from flexkd.training import autocast, make_trainer, runtime_device
from flexkd.validation import validate_config

log = logging.getLogger(__name__)


@dataclass
class Timings:
    seconds: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        log.info("stage %s ...", name)
        try:
            yield
        finally:
            self.seconds[name] = round(time.perf_counter() - start, 3)


def output_dir_of(cfg: DictConfig) -> Path:
    """Hydra's runtime output dir (honours hydra.run.dir / hydra.sweep.dir overrides)."""
    if cfg.get("output_dir"):
        return Path(cfg.output_dir)
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def cache_dir_of(cfg: DictConfig) -> Path:
    return Path(cfg.cache_dir).expanduser() if cfg.get("cache_dir") else default_cache_dir()


def load_tokenizers(cfg: DictConfig, resolve):
    """Student and teacher tokenizers; one object when both name the same source."""
    student_spec, teacher_spec = (OmegaConf.to_container(cfg.pair[s], resolve=True)
                                  for s in ("student", "teacher"))
    student_tok = load_tokenizer(student_spec, resolve)
    same = ((teacher_spec.get("tokenizer") or teacher_spec.get("path"))
            == (student_spec.get("tokenizer") or student_spec.get("path")))
    return student_tok, (student_tok if same else load_tokenizer(teacher_spec, resolve))


@dataclass
class RunContext:
    """What every stage of one run shares."""

    cfg: DictConfig
    out: Path
    cache_dir: Path
    timings: Timings = field(default_factory=Timings)

    @classmethod
    def create(cls, cfg: DictConfig) -> RunContext:
        # Lightning's tips and device banners bury the run's own log lines.
        logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
        out = output_dir_of(cfg)
        out.mkdir(parents=True, exist_ok=True)
        return cls(cfg, out, cache_dir_of(cfg))

    def resolve(self, source: str) -> str:
        return resolve_source(source, self.cache_dir)

    @property
    def device(self):
        return runtime_device(self.cfg.trainer)

    def precision(self):
        return autocast(self.cfg.trainer, self.device)


def run(cfg: DictConfig) -> dict | None:
    """Run one experiment end to end; returns the results dict (also written to disk), or None
    on DDP ranks other than 0."""
    ctx = RunContext.create(cfg)
    with ctx.timings.stage("assets"):
        validate_config(cfg, ctx.resolve)
        task = TaskSpec.from_config(cfg.task, ctx.resolve)
        student_tok, teacher_tok = load_tokenizers(cfg, ctx.resolve)
    with ctx.timings.stage("teacher"):
        teacher = prepare_teacher(cfg.pair.teacher, cfg.teacher_finetune, cfg.trainer, task,
                                  teacher_tok, ctx.cache_dir, ctx.resolve,
                                  eval_batch_size=cfg.data.eval_batch_size,
                                  label_words=uses_label_words(cfg.pair))

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    strategy_cfg = OmegaConf.to_container(cfg.strategy, resolve=True)
    strategy, name = build_strategy(strategy_cfg), strategy_cfg["name"]
    label_words = uses_label_words(cfg.pair)
    # The teacher above is the full-data one; distillation may see only a subset (low data).
    student_task = task.with_train_subset(cfg.data.get("train_fraction", 1.0),
                                          cfg.data.get("subset_seed", 0))
    data = data_module(cfg, student_task, student_tok, teacher_tok, label_words)
    with ctx.timings.stage("student"):
        student = build_student(ctx, task, teacher, data, student_tok, label_words)
        student, healing = heal_student(ctx, student, data, student_tok)
        student_init = initial_report(ctx, task, student, student_tok, data) | {"healing": healing}

    with ctx.timings.stage("probe"):
        setup_strategy(ctx, strategy, teacher, student, data)
    with ctx.timings.stage("teacher_store"):
        store = prepare_store(ctx, strategy, teacher, data)
    with ctx.timings.stage("distill"):
        trainer, loggers, resume = distill(ctx, strategy, teacher, student, data, name,
                                           teacher_outputs=store.outputs)
    # A resumed job's training time includes its earlier attempts' (this one's alone misleads).
    ctx.timings.seconds["distill"] = round(ctx.timings.seconds["distill"]
                                           + resume.seconds_before_resume, 3)
    if not trainer.is_global_zero:
        return None  # DDP: rank 0 evaluates and reports
    with ctx.timings.stage("evaluate"):
        reports = evaluate(ctx, task, teacher, student, student_tok, teacher_tok, data)
    if cfg.save_student:
        with ctx.timings.stage("save"):
            save_model(student, student_tok, ctx.out / "student")

    results = {
        "pair": cfg.pair.name,
        "task": task.name,
        "strategy": name,
        "variant": variant_of(strategy_cfg),
        "seed": int(cfg.seed),
        "main_metric": cfg.task.main_metric,
        "metrics": reports["metrics"],
        "eval_settings": reports["settings"],
        "samples": reports["samples"],
        "probe": strategy.diagnostics(),
        "checkpoint_selection": selection_summary(trainer),
        "layers": {"final_norm_state": {"teacher": teacher.model.final_norm_state,
                                        "student": student.final_norm_state}},
        "attention": {"teacher": teacher.model.attention_kernel, "student": student.attention_kernel},
        "params": {
            "student": total_parameters(student),
            "student_trainable": trainable_parameters(student),
            "strategy_extra_trainable": strategy.extra_trainable_parameters(),
            "teacher": total_parameters(teacher.model),
        },
        "teacher": teacher.info,
        "teacher_store": store.info,
        "student_init": student_init,
        "width_ratio": width_ratio(teacher.model, student),
        "train": {"steps": int(trainer.global_step),
                  "resumed_from": str(resume.resumed_from) if resume.resumed_from else None,
                  "seconds_before_resume": round(resume.seconds_before_resume, 3)},
        "alignment": alignment_report(data),
        "data": data_report(data),
    }
    return report(ctx, results, loggers)


def data_report(data: DistillDataModule) -> dict:
    """What the student was distilled on: its training examples (after train_fraction) and
    the split's rows before it."""
    return {"train_examples": len(data.splits["train"]),
            "train_examples_available": data.available.get("train"),
            "train_fraction": data.task.train_fraction, "subset_seed": data.task.subset_seed}


def data_module(cfg: DictConfig, task, student_tok, teacher_tok, label_words: bool) -> DistillDataModule:
    """The run's data, set up: the `data` and `alignment` settings applied to `task`."""
    data = DistillDataModule(task, student_tok, teacher_tok, batch_size=cfg.data.batch_size,
                             eval_batch_size=cfg.data.eval_batch_size, seed=cfg.seed,
                             num_workers=cfg.data.num_workers, label_words=label_words,
                             bucket_by_length=cfg.data.bucket_by_length,
                             alignment_pool=cfg.alignment.pool)
    data.setup()
    return data


def alignment_report(data: DistillDataModule) -> dict | None:
    """Two tokenizers: the training split's alignment statistics and the pooling; None with one."""
    if data.shared:
        return None
    stats = data.alignment_stats("train")
    return {"pool": data.alignment_pool,
            **(stats.to_dict() if stats is not None else {"unaligned": "a tokenizer is not fast"})}


def build_student(ctx: RunContext, task, teacher, data, tokenizer, label_words: bool):
    """The student. A pruned one (`pair.student.prune`) ranks its source's residual dims by the
    teacher's Flex-KD probe (the default) and its heads/channels by activations on the first
    64 training examples (file order)."""
    spec = OmegaConf.to_container(ctx.cfg.pair.student, resolve=True)
    prune = spec.get("prune")
    calibration = scores = None
    if prune:
        calibration = [b["student"] for b in data.probe_dataloader(64, ctx.cfg.data.eval_batch_size)]
        scores = pruning_probe(ctx, prune, teacher, data)
    return build_model(spec, task.format, tokenizer, task.label_names, ctx.resolve, seed=ctx.cfg.seed,
                       label_words=label_words, cache_dir=ctx.cache_dir, calibration=calibration,
                       prune_scores=scores)


def heal_student(ctx: RunContext, student, data, tokenizer):
    """(student, record): the student after its healing pass (`pair.student.heal`, cached), or
    as it was and None when the pair asks for none."""
    from flexkd.healing import heal_settings, healed_student

    spec = OmegaConf.to_container(ctx.cfg.pair.student, resolve=True)
    heal = heal_settings(spec)
    if heal is None:
        return student, None
    student, record = healed_student(student, heal, data, tokenizer, ctx.cfg.trainer, ctx.cache_dir,
                                     attention=spec.get("attn_implementation"))
    # Healing draws random numbers only when it builds: reseed so that distillation's random
    # stream is the same whether the healed student came from the cache or not.
    L.seed_everything(ctx.cfg.seed, workers=True, verbose=False)
    return student, record


def pruning_probe(ctx: RunContext, prune: dict, teacher, data):
    """Per-dim importance of the teacher's residual stream for `prune.rank_by: probe`, or None.

    The settings are the probe defaults (k = the student width), which the Flex-KD strategy
    declares as its own, so a later Flex-KD run with a matching layer/score reuses this
    cached probe. Dims of the stream are one space through all blocks, so one layer's scores
    (the last by default) rank them everywhere."""
    from flexkd.importance import ProbeConfig, cached_probe
    from flexkd.pruning import SPEC_RANKING

    if prune.get("rank_by", SPEC_RANKING) != "probe":
        return None
    d_t = teacher.model.hidden_size
    # ProbeConfig's defaults are the ones the Flex-KD strategy declares for its own probe.
    cfg = ProbeConfig(layer=teacher.model.layer_index(prune.get("probe_layer", -1)),
                      score=prune.get("probe_score", ProbeConfig.score),
                      k=min(prune.get("hidden_size") or d_t, d_t), seed=ctx.cfg.seed)
    cfg.validate()
    teacher.model.to(ctx.device)
    with ctx.precision():
        result = cached_probe(teacher.model, data.probe_dataloader(cfg.examples, cfg.batch_size), cfg,
                              ctx.cache_dir, teacher.fingerprint, data.task.fingerprint())
    return result.scores.detach().float().cpu()


def initial_report(ctx: RunContext, task, student, tokenizer, data) -> dict:
    """The student before distillation: its validation metrics (accuracy / response perplexity)
    and, for a pruned student, the pruning record (source, plan, kept shape, parameters
    before/after, cache path and hit)."""
    import torch

    from flexkd.evaluation.evaluate import single_token_label_ids

    student.to(ctx.device)
    with torch.random.fork_rng(), ctx.precision():  # training's random stream stays as it was
        metrics = evaluate_model(student, data.val_dataloader(), desc="student before training",
                                 label_ids=single_token_label_ids(student, tokenizer, task))
    return {"validation": metrics, "parameters": total_parameters(student),
            "pruning": getattr(student.backbone, "flexkd_pruning", None)}


def width_ratio(teacher, student) -> float:
    """d_T / d_S, the residual widths' ratio (a numeric dimension of the benchmark tables)."""
    return round(teacher.hidden_size / student.hidden_size, 4)


def setup_strategy(ctx: RunContext, strategy, teacher, student, data) -> None:
    """Strategy preparation: the Flex-KD probe (cached), a projector, pair checks."""
    teacher.model.to(ctx.device)
    with ctx.precision():
        strategy.setup(SetupContext(teacher=teacher.model, student=student, datamodule=data,
                                    cache_dir=str(ctx.cache_dir),
                                    teacher_fingerprint=teacher.fingerprint, seed=ctx.cfg.seed))


def prepare_store(ctx: RunContext, strategy, teacher, data):
    """The teacher-output store (`teacher_store`: auto|off), built on a cache miss."""
    from flexkd.teacher_store import teacher_store

    return teacher_store(ctx.cfg.get("teacher_store", "auto"), strategy, teacher.model, data,
                         cache_dir=ctx.cache_dir, teacher_fingerprint=teacher.fingerprint,
                         trainer_cfg=ctx.cfg.trainer, device=ctx.device,
                         precision=ctx.precision(), batch_size=ctx.cfg.data.eval_batch_size)


def distill(ctx: RunContext, strategy, teacher, student, data, name: str, teacher_outputs=None):
    """Train the student with Lightning, resuming from the run's last checkpoint if any.
    `teacher_outputs`: a store of the teacher's answers; the live teacher when None."""
    from flexkd.module import DistillationModule

    cfg = ctx.cfg
    live = strategy.needs_teacher and teacher_outputs is None
    module = DistillationModule(student, strategy, teacher=teacher.model if live else None,
                                teacher_outputs=teacher_outputs, **cfg.optim)
    loggers = build_loggers(cfg, ctx.out, {"pair": cfg.pair.name, "task": cfg.task.name,
                                           "strategy": name, "seed": int(cfg.seed)})
    checkpoints = ctx.out / "checkpoints"
    if cfg.resume == "never":
        shutil.rmtree(checkpoints, ignore_errors=True)
    resume = ResumeCheckpoint(checkpoints, cfg.checkpoint.every_n_steps)
    selection = checkpoint_selection(cfg.eval, student, data.tokenizers["student"], data.task)
    trainer = make_trainer(cfg.trainer, ctx.out, logger=loggers, progress="distill",
                           callbacks=[resume, *([selection] if selection else [])])
    student.train()  # from_pretrained returns eval mode; dropout belongs to training
    with exact_mid_epoch_resume():
        trainer.fit(module, datamodule=data, ckpt_path=resume.resumed_from)
    return trainer, loggers, resume


def evaluate(ctx: RunContext, task, teacher, student, student_tok, teacher_tok, data) -> dict:
    """Test metrics of student and teacher (the teacher's cached), validation metrics,
    eval samples with both models' outputs."""
    student.to(ctx.device)
    with ctx.precision():
        student_report = evaluate_on_task(student, student_tok, task, data.test_dataloader(),
                                          ctx.cfg.eval)
        teacher_report = evaluate_teacher(teacher, teacher_tok, task, ctx.cfg.eval)
        student_val = evaluate_model(student, data.val_dataloader(), desc="student validation")
    return {
        "metrics": {"student": student_report["metrics"], "teacher": teacher_report["metrics"],
                    "validation": {"student": student_val,
                                   "teacher": teacher.metrics.get("validation", {})}},
        "settings": student_report["settings"] or {"batch_size": ctx.cfg.data.eval_batch_size},
        "samples": merge_samples(student_report["samples"], teacher_report["samples"]),
    }


def report(ctx: RunContext, results: dict, loggers=()) -> dict:
    """Complete results.json (timings, paths, environment, config), write it atomically, hand
    it to the loggers and print the summary table."""
    student_dir = ctx.out / "student"
    results.update({
        "timings": ctx.timings.seconds,
        "paths": {"results": str(ctx.out / "results.json"), "logs": str(ctx.out / "logs"),
                  "student": str(student_dir) if student_dir.exists() else None},
        "environment": environment(),
        "config": OmegaConf.to_container(ctx.cfg, resolve=True),
    })
    write_results(ctx.out, results)
    finish_loggers(list(loggers), results, samples=results.get("samples"),
                   student_dir=student_dir if student_dir.exists() else None)
    print(summary_table(results), flush=True)
    return results


def evaluate_only(cfg: DictConfig) -> dict:
    """`stage=eval`: score a saved student (or any saved flexkd model dir) without training."""
    if not cfg.get("eval_model"):
        raise ConfigError("stage=eval needs eval_model=<dir>: a run's `student` directory "
                          "(see paths.student in its results.json)")
    ctx = RunContext.create(cfg)
    with ctx.timings.stage("load"):
        validate_config(cfg, ctx.resolve)
        # Absolute, so that benchmarks.tables finds the training job beside it from anywhere.
        model_dir = str(Path(ctx.resolve(str(cfg.eval_model))).resolve())
        # the kernel the pair's student trained and was scored with (a saved config drops it)
        model, tokenizer = load_saved_model(model_dir, cfg.pair.student.get("attn_implementation"))
        task = TaskSpec.from_config(cfg.task, ctx.resolve)
        data = DistillDataModule(task, tokenizer, eval_batch_size=cfg.data.eval_batch_size,
                                 label_words=model.kind == "causal_lm")
    model.to(ctx.device)
    with ctx.timings.stage("evaluate"), ctx.precision():
        scored = evaluate_on_task(model, tokenizer, task, data.test_dataloader(), cfg.eval)
    return report(ctx, {
        "stage": "eval", "model": model_dir, "pair": cfg.pair.name, "task": task.name,
        "strategy": "eval", "seed": int(cfg.seed), "main_metric": cfg.task.main_metric,
        "metrics": {"student": scored["metrics"]},
        "eval_settings": scored["settings"] or {"batch_size": cfg.data.eval_batch_size},
        "samples": scored["samples"], "params": {"student": total_parameters(model)},
        "attention": {"student": model.attention_kernel},
    })


def main_metric(results: dict) -> float:
    """The sweep objective: the student's main test metric (the teacher's for stage=removal,
    which has no student)."""
    side = "student" if "student" in results["metrics"] else "teacher"
    return float(results["metrics"][side][results["main_metric"]])
