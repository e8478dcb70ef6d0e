"""Training-step throughput (and GPU memory) of every strategy, measured side by side.

    python -m benchmarks.speed                              # tiny pair, CPU, fp32
    python -m benchmarks.speed pair=mpnet_minilm task=rt_polarity --steps 10 --precision bf16
    python -m benchmarks.speed ... --device cuda --precision bf16

Every strategy is timed on the same batches, round-robin (A B C A B C ...) so that machine
noise hits all of them alike, and the report gives each one's time per step as a ratio to
plain fine-tuning (`sft`). The teacher is random-init or pretrained as the pair says; it is
not fine-tuned here (speed does not depend on it), and the probe is timed once.
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from omegaconf import OmegaConf

import flexkd.cli  # noqa: F401  (offline defaults, resolvers)
from flexkd.data.datamodule import DistillDataModule
from flexkd.data.tasks import TaskSpec
from flexkd.errors import ConfigError
from flexkd.models import build_model, trainable_parameters, uses_label_words
from flexkd.pipeline import cache_dir_of, load_tokenizers
from flexkd.sources import resolve_source
from flexkd.step import LiveTeacher, distill_terms
from flexkd.strategies import SetupContext, available_strategies, build_strategy

CONF = Path(__file__).resolve().parents[1] / "conf"
# Every strategy config, sft first (the reference); strategies that need d_S == d_T (raw) fail
# on a mismatched pair and are reported as skipped.
STRATEGIES = sorted(available_strategies(), key=lambda name: name != "sft")


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


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides (pair=..., task=...)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per strategy")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    args = parser.parse_args(argv)

    defaults = ["pair=tiny_encoder", "task=tiny_cls"]
    keys = {o.split("=")[0] for o in args.overrides}
    cfg = compose([o for o in defaults if o.split("=")[0] not in keys] + args.overrides)
    cache_dir = cache_dir_of(cfg)

    def resolve(source: str) -> str:
        return resolve_source(source, cache_dir)

    task = TaskSpec.from_config(cfg.task, resolve)
    student_tok, teacher_tok = load_tokenizers(cfg, resolve)
    plain = lambda node: {k: v for k, v in node.items()}  # noqa: E731
    label_words = uses_label_words(cfg.pair)
    teacher = build_model(plain(cfg.pair.teacher), task.format, teacher_tok, task.label_names,
                          resolve, label_words=label_words).to(args.device).eval().requires_grad_(False)
    data = DistillDataModule(task, student_tok, teacher_tok, batch_size=cfg.data.batch_size,
                             seed=0, label_words=label_words)
    batches = []
    for i, batch in enumerate(data.train_dataloader()):
        if i >= args.steps + args.warmup:
            break
        batches.append(torch.utils._pytree.tree_map(
            lambda t: t.to(args.device) if torch.is_tensor(t) else t, batch))

    runs = {}
    for name in args.strategies.split(","):
        torch.manual_seed(0)
        student = build_model(plain(cfg.pair.student), task.format, student_tok,
                              task.label_names, resolve, label_words=label_words).to(args.device).train()
        strategy = build_strategy(OmegaConf.to_container(compose([f"strategy={name}"]).strategy,
                                                         resolve=True))
        start = time.perf_counter()
        try:
            strategy.setup(SetupContext(teacher=teacher, student=student, datamodule=data,
                                        cache_dir=None, teacher_fingerprint="speed"))
        except ConfigError as e:  # this pair does not fit the strategy (raw on d_S != d_T)
            print(f"skipping {name}: {e}")
            continue
        setup_s = time.perf_counter() - start
        strategy.to(args.device)
        params = [p for p in list(student.parameters()) + list(strategy.parameters())
                  if p.requires_grad]
        runs[name] = {"student": student, "strategy": strategy, "times": [], "setup_s": setup_s,
                      "optimizer": torch.optim.AdamW(params, lr=1e-5),
                      "teacher_outputs": LiveTeacher(teacher, strategy),
                      "extra_params": trainable_parameters(strategy)}

    def step(run, batch) -> float:
        strategy, student = run["strategy"], run["student"]
        sync(args.device)
        start = time.perf_counter()
        with autocast(args.device, args.precision):
            loss = sum(distill_terms(strategy, student, batch, run["teacher_outputs"]).values())
        loss.backward()
        run["optimizer"].step()
        run["optimizer"].zero_grad(set_to_none=True)
        sync(args.device)
        return time.perf_counter() - start

    for i, batch in enumerate(batches):
        for run in runs.values():
            if args.device == "cuda" and i == args.warmup:
                torch.cuda.reset_peak_memory_stats()
            elapsed = step(run, batch)
            if i >= args.warmup:
                run["times"].append(elapsed)
            if args.device == "cuda":
                run["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30

    base = statistics.median(runs["sft"]["times"]) if "sft" in runs else None
    print(f"pair={cfg.pair.name} task={task.name} device={args.device} "
          f"precision={args.precision} batch={cfg.data.batch_size} steps={args.steps}")
    print(f"{'strategy':<12}{'s/step':>10}{'x sft':>8}{'setup s':>10}{'extra params':>14}"
          f"{'peak GiB':>10}")
    report = {}
    for name, run in runs.items():
        med = statistics.median(run["times"])
        ratio = med / base if base else float("nan")
        peak = run.get("peak_gib")
        print(f"{name:<12}{med:>10.3f}{ratio:>8.2f}{run['setup_s']:>10.2f}"
              f"{run['extra_params']:>14}{(f'{peak:.2f}' if peak else '-'):>10}")
        report[name] = {"seconds_per_step": med, "ratio_to_sft": ratio,
                        "setup_seconds": run["setup_s"], "peak_gib": peak}
    return report


if __name__ == "__main__":
    main()
