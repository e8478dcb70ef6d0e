"""Training-step throughput (and GPU memory) of every strategy, measured side by side.

    python -m benchmarks.speed                              # tiny pair, CPU, fp32
    python -m benchmarks.speed pair=mpnet_minilm task=rt_polarity --steps 10 --precision bf16
    python -m benchmarks.speed ... --device cuda --precision bf16
    python -m benchmarks.speed pair=mpnet_minilm task=rt_polarity --sweep --sweep-steps 20

Three measurements, in one run:

1. Every strategy's step, with the live teacher and with the teacher-output store
   (flexkd.teacher_store), timed on the same batches round-robin (A B C A B C ...) so that
   machine noise hits all of them alike, each as a ratio to plain fine-tuning (`sft`), after
   one untimed step of each at every batch shape. Causal pairs also time every strategy with
   the live teacher and both models' LM heads on every position (`all pos s`), as before
   `CausalLM` ran them on the response rows only: `rows/all` is the saving.
   The store covers the benchmark's own training examples (`task.max_train_examples` is set
   to steps x batch unless given); reading it does not depend on its size (memory-mapped).
2. The harness's Lightning step (DistillationModule + Trainer, as run.py trains) against a
   bare PyTorch loop doing the same math (distill_terms, backward, clip, AdamW, schedule) on the
   same batches, for `--harness-strategy` with the store.
3. `--sweep`: the wall time of `python run.py -m experiment=... trainer.max_steps=...` with
   `teacher_store=off` and with `teacher_store=auto` (store builds included: a fresh cache that
   links the real one's assets and teachers).

The teacher is random-init or pretrained as the pair says; it is not fine-tuned in 1-2 (speed
does not depend on it), and the probe is timed once (and cached).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

import flexkd.cli  # noqa: F401  (offline defaults, resolvers)
from flexkd.data.datamodule import DistillDataModule
from flexkd.data.tasks import TaskSpec
from flexkd.errors import ConfigError
from flexkd.models import CausalLM, build_model, trainable_parameters, uses_label_words
from flexkd.module import adamw
from flexkd.pipeline import cache_dir_of, load_tokenizers
from flexkd.sources import resolve_source
from flexkd.step import LiveTeacher, distill_terms
from flexkd.storage import atomic_write_json, content_hash
from flexkd.strategies import SetupContext, available_strategies, build_strategy
from flexkd.teacher_store import teacher_store

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
# Every strategy config, sft first (the reference); strategies that need d_S == d_T (raw) fail
# on a mismatched pair and are reported as skipped.
STRATEGIES = sorted(available_strategies(), key=lambda name: name != "sft")
ALL_POSITIONS = "live, every position's logits"  # the mode that times the old LM-head cost


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose("config", overrides=overrides)


def autocast(device: str, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device, dtype=torch.bfloat16)
    return nullcontext()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def to_device(batch, device: str):
    return torch.utils._pytree.tree_map(lambda t: t.to(device) if torch.is_tensor(t) else t, batch)


def padded_length(batch: dict) -> int:
    return max(batch["student"]["input_ids"].shape[1], batch["teacher"]["input_ids"].shape[1])


def batch_shape(batch: dict) -> tuple:
    return tuple(batch[side]["input_ids"].shape for side in ("student", "teacher"))


@contextmanager
def every_position_logits(enabled: bool):
    """While enabled, causal LMs compute the logits of every position (the cost before
    `CausalLM` learned to keep only the response rows)."""
    before = CausalLM.logits_on_response_rows
    CausalLM.logits_on_response_rows = not enabled
    try:
        yield
    finally:
        CausalLM.logits_on_response_rows = before


def trainer_precision(precision: str) -> str:
    return "bf16-mixed" if precision == "bf16" else "32-true"


def plain(node) -> dict:
    return {k: v for k, v in node.items()}


@dataclass
class Setting:
    """A benchmark's composed config, task, tokenizers and its first training batches."""
    cfg: Any
    cache_dir: Path
    resolve: Callable[[str], str]
    task: TaskSpec
    student_tok: Any
    teacher_tok: Any
    label_words: bool
    data: DistillDataModule
    batches: list  # on the CPU, moved per step (as a DataLoader's batches are)

    @classmethod
    def load(cls, overrides: list[str], n_batches: int) -> Setting:
        """Hydra `overrides` over the tiny encoder pair and task; the training split is cut to
        the `n_batches` batches the benchmark reads unless `task.max_train_examples` is given."""
        defaults = ["pair=tiny_encoder", "task=tiny_cls"]
        keys = {o.split("=")[0] for o in overrides}
        overrides = [o for o in defaults if o.split("=")[0] not in keys] + list(overrides)
        cfg = compose(overrides)
        if "task.max_train_examples" not in keys:
            cfg = compose(overrides + [f"task.max_train_examples={n_batches * cfg.data.batch_size}"])
        cache_dir = cache_dir_of(cfg)

        def resolve(source: str) -> str:
            return resolve_source(source, cache_dir)

        task = TaskSpec.from_config(cfg.task, resolve)
        student_tok, teacher_tok = load_tokenizers(cfg, resolve)
        label_words = uses_label_words(cfg.pair)
        data = DistillDataModule(task, student_tok, teacher_tok, batch_size=cfg.data.batch_size,
                                 seed=0, label_words=label_words)
        batches = [batch for _, batch in zip(range(n_batches), data.train_dataloader(), strict=False)]
        return cls(cfg, cache_dir, resolve, task, student_tok, teacher_tok, label_words, data, batches)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides (pair=..., task=...)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per strategy")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--harness-strategy", default="flexkd",
                        help="the strategy of the Lightning-vs-bare-loop comparison ('' to skip)")
    parser.add_argument("--harness-rounds", type=int, default=3,
                        help="Lightning runs of the harness comparison, each between two bare runs")
    parser.add_argument("--sweep", action="store_true",
                        help="also time a run.py sweep with and without the store")
    parser.add_argument("--sweep-experiment", default="rt_polarity_baselines")
    parser.add_argument("--sweep-steps", type=int, default=150, help="trainer.max_steps per job")
    parser.add_argument("--sweep-args", default="",
                        help="more run.py overrides for the sweep, space-separated")
    parser.add_argument("--sweep-dir", default=None,
                        help="keep the two sweeps (and the store side's cache) here; "
                             "default: a temporary directory, removed afterwards")
    parser.add_argument("--report", default=None, help="also write the numbers to this JSON file")
    args = parser.parse_args(argv)
    # The store builds' and probes' progress lines.
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s")

    bench = Setting.load(args.overrides, args.steps + args.warmup)
    cfg, task, resolve, data, batches = bench.cfg, bench.task, bench.resolve, bench.data, bench.batches
    cache_dir, label_words, student_tok = bench.cache_dir, bench.label_words, bench.student_tok
    teacher_spec = plain(cfg.pair.teacher)
    teacher = build_model(teacher_spec, task.format, bench.teacher_tok, task.label_names,
                          resolve, label_words=label_words).to(args.device).eval().requires_grad_(False)
    fingerprint = "speed:" + content_hash({"spec": teacher_spec, "label_words": label_words})
    precision = {"precision": trainer_precision(args.precision)}

    runs = {}
    for name in args.strategies.split(","):
        torch.manual_seed(0)
        student = build_model(plain(cfg.pair.student), task.format, student_tok, task.label_names,
                              resolve, label_words=label_words, cache_dir=cache_dir).to(args.device).train()
        strategy = build_strategy(OmegaConf.to_container(compose([f"strategy={name}"]).strategy,
                                                         resolve=True))
        start = time.perf_counter()
        try:
            with autocast(args.device, args.precision):
                strategy.setup(SetupContext(teacher=teacher, student=student, datamodule=data,
                                            cache_dir=str(cache_dir), teacher_fingerprint=fingerprint))
        except ConfigError as e:  # this pair does not fit the strategy (raw on d_S != d_T)
            print(f"skipping {name}: {e}")
            continue
        setup_s = time.perf_counter() - start
        strategy.to(args.device)
        start = time.perf_counter()
        store = teacher_store("auto", strategy, teacher, data, cache_dir=cache_dir,
                              teacher_fingerprint=fingerprint, trainer_cfg=precision,
                              device=torch.device(args.device),
                              precision=autocast(args.device, args.precision),
                              batch_size=cfg.data.eval_batch_size)
        store_s = time.perf_counter() - start
        params = [p for p in list(student.parameters()) + list(strategy.parameters())
                  if p.requires_grad]
        modes = {"live": LiveTeacher(teacher, strategy)}
        if store.outputs is not None:
            modes["store"] = store.outputs
        if isinstance(student, CausalLM):
            modes[ALL_POSITIONS] = modes["live"]
        runs[name] = {"student": student, "strategy": strategy, "setup_s": setup_s,
                      "store_s": store_s, "store": store, "modes": modes,
                      "times": {mode: [] for mode in modes},
                      "optimizer": adamw(params, lr=1e-5, weight_decay=0.01),
                      "extra_params": trainable_parameters(strategy)}

    def step(run, batch, teacher_outputs, mode) -> float:
        strategy, student = run["strategy"], run["student"]
        sync(args.device)
        start = time.perf_counter()
        batch = to_device(batch, args.device)
        with autocast(args.device, args.precision), every_position_logits(mode == ALL_POSITIONS):
            loss = sum(distill_terms(strategy, student, batch, teacher_outputs).values())
        loss.backward()
        run["optimizer"].step()
        run["optimizer"].zero_grad(set_to_none=True)
        sync(args.device)
        return time.perf_counter() - start

    # The first step at a new batch shape pays one-time costs (CUDA allocator growth, kernel
    # choice) that would land on whichever strategy steps first (without this, sft's step
    # measured 6-12x flexkd's on an H200). Each run and mode first takes one untimed step per shape.
    for batch in {batch_shape(b): b for b in batches[args.warmup:]}.values():
        for run in runs.values():
            for mode, teacher_outputs in run["modes"].items():
                step(run, batch, teacher_outputs, mode)

    for i, batch in enumerate(batches):
        for run in runs.values():
            for mode, teacher_outputs in run["modes"].items():
                if args.device == "cuda":  # each step's own peak (all runs' models resident)
                    torch.cuda.reset_peak_memory_stats()
                elapsed = step(run, batch, teacher_outputs, mode)
                if i >= args.warmup:
                    run["times"][mode].append(elapsed)
                    if args.device == "cuda" and mode != ALL_POSITIONS:
                        peak = torch.cuda.max_memory_allocated() / 2**30
                        run["peak_gib"] = max(run.get("peak_gib", 0.0), peak)

    med = {name: {mode: statistics.median(t) for mode, t in run["times"].items()}
           for name, run in runs.items()}
    base = med["sft"]["live"] if "sft" in med else None
    print(f"pair={cfg.pair.name} task={task.name} device={args.device} "
          f"precision={args.precision} batch={cfg.data.batch_size} steps={args.steps} "
          f"(median s/step; x sft = / sft's step)")
    # A step's cost follows its padded length, and bucketed batches vary: the absolute times
    # hold for batches of these lengths (the ratios compare the same batches).
    lengths = [padded_length(b) for b in batches[args.warmup:]]
    print(f"timed batches' padded lengths (the longer side): {lengths}, "
          f"mean {statistics.mean(lengths):.1f} tokens")
    print(f"{'strategy':<12}{'live s':>9}{'x sft':>7}{'store s':>9}{'x sft':>7}{'setup s':>9}"
          f"{'store MB':>10}{'build s':>9}{'extra params':>14}{'peak GiB':>10}")
    report = {"steps": {}, "batch_lengths": lengths}
    for name, run in runs.items():
        live, stored = med[name]["live"], med[name].get("store")
        ratio = lambda t: t / base if base and t is not None else float("nan")  # noqa: E731
        info = run["store"].info
        peak = run.get("peak_gib")
        fmt = lambda t, spec: "-" if t is None else format(t, spec)  # noqa: E731
        print(f"{name:<12}{live:>9.3f}{ratio(live):>7.2f}{fmt(stored, '.3f'):>9}"
              f"{fmt(stored and ratio(stored), '.2f'):>7}{run['setup_s']:>9.2f}"
              f"{fmt(info.get('size_mb'), '.1f'):>10}{run['store_s']:>9.1f}"
              f"{run['extra_params']:>14}{(f'{peak:.2f}' if peak else '-'):>10}")
        report["steps"][name] = {"seconds_per_step": live, "ratio_to_sft": ratio(live),
                                 "store_seconds_per_step": stored,
                                 "store_ratio_to_sft": ratio(stored) if stored else None,
                                 "setup_seconds": run["setup_s"], "store": info,
                                 "peak_gib": peak}

    if any(ALL_POSITIONS in m for m in med.values()):
        print(f"\nLM heads on the response rows vs on every position (live teacher):\n"
              f"{'strategy':<12}{'rows s':>9}{'all pos s':>11}{'rows/all':>10}")
        for name, m in med.items():
            rows, every = m["live"], m[ALL_POSITIONS]
            print(f"{name:<12}{rows:>9.3f}{every:>11.3f}{rows / every:>10.3f}")
            report["steps"][name].update(all_positions_seconds_per_step=every,
                                         rows_over_all_positions=rows / every)

    name = args.harness_strategy
    if name and name in runs:
        report["harness"] = harness_vs_bare(runs[name], batches, cfg, args)
    if args.sweep:
        report["sweep"] = time_sweep(args, cache_dir)
    print_targets(report)
    if args.report:
        atomic_write_json(args.report, report)
        print(f"report: {args.report}")
    return report


def print_targets(report: dict) -> None:
    """Issue 10's three ratios, as measured in this run (those it measured)."""
    flexkd = report["steps"].get("flexkd", {}).get("store_ratio_to_sft")
    rows = [("flexkd step with the store / sft step", flexkd, "<= 1.15"),
            ("Lightning step / bare loop step", report.get("harness", {}).get("ratio"), "<= 1.05"),
            ("sweep without the store / with it", report.get("sweep", {}).get("speedup"), ">= 2")]
    print("\ntargets (this run):")
    for label, value, target in rows:
        if value is not None:
            print(f"  {label:<40}{value:>7.2f}  (target {target})")


def harness_vs_bare(run, batches, cfg, args) -> dict:
    """The Lightning step of run.py's DistillationModule vs a bare loop of the same math on the
    same batches: step-to-step intervals (data fetch, hooks, logging, optimizer, scheduler)."""
    import lightning as L
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    from flexkd.module import DistillationModule, fused_allowed
    from flexkd.training import make_trainer

    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    teacher_outputs = run["modes"].get("store") or run["modes"]["live"]
    mode = "store" if "store" in run["modes"] else "live"
    optim = dict(cfg.optim)
    clip = cfg.trainer.get("gradient_clip_val")

    def bare(fused: bool) -> list[float]:
        student, strategy = copy.deepcopy(run["student"]), copy.deepcopy(run["strategy"])
        params = [p for p in list(student.parameters()) + list(strategy.parameters()) if p.requires_grad]
        optimizer = adamw(params, lr=optim["lr"], weight_decay=optim["weight_decay"], fused=fused)
        total = len(batches)
        scheduler = get_cosine_with_min_lr_schedule_with_warmup(
            optimizer, int(total * optim["warmup_ratio"]), total, min_lr_rate=0.1)
        marks = [time.perf_counter()]
        for batch in batches:
            batch = to_device(batch, args.device)
            with autocast(args.device, args.precision):
                loss = sum(distill_terms(strategy, student, batch, teacher_outputs).values())
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(params, clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            sync(args.device)
            marks.append(time.perf_counter())
        return [b - a for a, b in zip(marks, marks[1:], strict=False)]

    class Marks(L.Callback):
        def __init__(self):
            self.marks = []

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if not self.marks:
                self.marks.append(time.perf_counter())

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            sync(args.device)
            self.marks.append(time.perf_counter())

    def lightning(trainer: L.Trainer, marks: Marks) -> list[float]:
        student, strategy = copy.deepcopy(run["student"]), copy.deepcopy(run["strategy"])
        module = DistillationModule(student, strategy, teacher_outputs=teacher_outputs, **optim)
        loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False)
        student.train()
        trainer.fit(module, train_dataloaders=loader)
        return [b - a for a, b in zip(marks.marks, marks.marks[1:], strict=False)]

    def make(tmp: str, marks: Marks) -> L.Trainer:
        return make_trainer(cfg.trainer, tmp, callbacks=[marks], progress="speed",
                            accelerator="gpu" if args.device == "cuda" else "cpu",
                            precision=trainer_precision(args.precision),
                            max_steps=len(batches), max_epochs=None, limit_val_batches=0,
                            num_sanity_val_steps=0, enable_checkpointing=False,
                            enable_progress_bar=False)

    skip = args.warmup
    with tempfile.TemporaryDirectory() as tmp:
        # The bare loop steps the optimizer kernel the harness's trainer gets (fused or not).
        fused = fused_allowed(make(tmp, Marks()))
        # bare, Lightning, bare, ..., bare: a few tens of ms separate the two, about what the
        # machine drifts in a minute, so the arms alternate and each pools its rounds' steps.
        bare_runs = [bare(fused)[skip:]]
        harness_runs = []
        for _ in range(args.harness_rounds):
            marks = Marks()
            harness_runs.append(lightning(make(tmp, marks), marks)[skip:])
            bare_runs.append(bare(fused)[skip:])
    bare_s = statistics.median([t for run_ in bare_runs for t in run_])
    harness_s = statistics.median([t for run_ in harness_runs for t in run_])
    per_round = lambda runs: " / ".join(f"{statistics.median(r):.3f}" for r in runs)  # noqa: E731
    print(f"\nLightning step vs bare loop ({run['strategy'].name}, {mode} teacher, "
          f"{args.harness_rounds} Lightning runs between {len(bare_runs)} bare runs, "
          f"{len(batches) - skip} steps each): Lightning {harness_s:.3f} s "
          f"(runs {per_round(harness_runs)}), bare {bare_s:.3f} s (runs {per_round(bare_runs)}), "
          f"ratio {harness_s / bare_s:.3f}")
    return {"strategy": run["strategy"].name, "teacher": mode, "lightning_seconds": harness_s,
            "bare_seconds": bare_s, "ratio": harness_s / bare_s, "rounds": args.harness_rounds,
            "lightning_runs": harness_runs, "bare_runs": bare_runs}


def time_sweep(args, cache_dir: Path) -> dict:
    """Wall time of one run.py sweep with `teacher_store=off` and with `auto`.

    The store side runs in a fresh cache whose assets, teacher fine-tunes and probes link to the
    real cache's, so its store builds are timed; the off side runs in the real cache."""
    common = [sys.executable, str(ROOT / "run.py"), "-m", f"experiment={args.sweep_experiment}",
              f"trainer.max_steps={args.sweep_steps}", "trainer.enable_progress_bar=false",
              "resume=never", *args.sweep_args.split()]
    times, stages = {}, {}
    keep = Path(args.sweep_dir).resolve() if args.sweep_dir else None
    with (nullcontext(keep) if keep else tempfile.TemporaryDirectory()) as tmp:
        fresh = Path(tmp) / "cache"
        if fresh.exists():
            shutil.rmtree(fresh)  # the store must be built (and timed) again
        fresh.mkdir(parents=True)
        for kind in ("teachers", "probe"):  # built once, shared by both sides
            (Path(cache_dir) / kind).mkdir(parents=True, exist_ok=True)
        for sub in Path(cache_dir).iterdir():  # everything but the stores
            if sub.is_dir() and sub.name != "teacher_store":
                (fresh / sub.name).symlink_to(sub.resolve())
        for setting, cache in (("off", cache_dir), ("auto", fresh)):
            out = Path(tmp) / f"sweep-{setting}"
            cmd = common + [f"teacher_store={setting}", f"cache_dir={cache}",
                            f"hydra.sweep.dir={out}"]
            print(f"\nsweep, teacher_store={setting}: {' '.join(cmd[1:])}", flush=True)
            start = time.perf_counter()
            proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})
            times[setting] = time.perf_counter() - start
            if (out / "sweep_summary.json").is_file():
                check_all_succeeded(out)  # names the failed jobs
            if proc.returncode != 0:
                raise SystemExit(f"the sweep failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
            stages[setting] = stage_medians(out)
            jobs = stages[setting].pop("jobs")
            print(f"  {jobs} jobs in {times[setting]:.0f} s; median seconds per job and stage: "
                  + ", ".join(f"{k} {v:.1f}" for k, v in stages[setting].items()), flush=True)
    ratio = times["off"] / times["auto"]
    print(f"\nsweep {args.sweep_experiment} (max_steps={args.sweep_steps}): without the store "
          f"{times['off']:.0f} s, with it {times['auto']:.0f} s: {ratio:.2f}x faster")
    return {"off_seconds": times["off"], "auto_seconds": times["auto"], "speedup": ratio,
            "median_stage_seconds": stages, **({"sweep_dir": str(keep)} if keep else {})}


def check_all_succeeded(sweep_dir: Path) -> None:
    """A sweep with a failed job exits 0 (the others go on), and its wall time then times fewer
    jobs than the other side's: refuse to compare it."""
    summary_path = sweep_dir / "sweep_summary.json"
    if not summary_path.exists():
        raise SystemExit(f"the sweep left no {summary_path}; its jobs' outcome is unknown")
    summary = json.loads(summary_path.read_text())
    bad = [job for job in summary["jobs"] if job["status"] != "success"]
    if bad or not summary["jobs"]:
        lines = "\n".join(f"  job {j['job']} {' '.join(j['overrides'])}: {j['status']}: {j['error']}"
                          for j in bad)
        raise SystemExit(f"{len(bad)} of {len(summary['jobs'])} jobs of {sweep_dir} did not succeed, "
                         f"so its wall time cannot be compared (fix the cause, e.g. free disk "
                         f"space, and run the benchmark again):\n{lines}")


def stage_medians(sweep_dir: Path) -> dict:
    """The jobs' `timings` (results.json), median per stage, and the number of jobs."""
    timings = [json.loads(p.read_text()).get("timings", {}) for p in sweep_dir.rglob("results.json")]
    stages = sorted({k for t in timings for k in t})
    return {"jobs": len(timings),
            **{k: statistics.median(t.get(k, 0.0) for t in timings) for k in stages}}


if __name__ == "__main__":
    main()
