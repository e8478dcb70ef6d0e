"""Variants of one student's training step, timed side by side on the same batches.

Shared by the benchmarks that compare how a step is computed, not what it computes
(`benchmarks.attention`: attention kernels; `benchmarks.optimizer`: AdamW kernels). Each variant
is a student and its optimizer; they step the student's own loss (`sft`: the variants change
the student's compute alike under every strategy) round-robin (A B A B ...), after one untimed
step of each at every batch shape, and each variant's median seconds per step (forward,
backward, clip + optimizer) is printed with its ratio to the first variant's.
"""

from __future__ import annotations

import statistics
import time

import torch
from omegaconf import OmegaConf

from benchmarks.speed import Setting, autocast, batch_shape, compose, padded_length, sync, to_device
from flexkd.step import distill_terms
from flexkd.strategies import build_strategy

PARTS = ("forward", "backward", "optimizer")


def race(bench: Setting, variants: dict, device: str, precision: str, label: str) -> dict:
    """`variants`: name -> (student, optimizer), the first the reference. Returns each one's
    median seconds per part and step, its ratio to the reference and its loss on the first
    batch without dropout (variants of one function differ there by rounding only)."""
    sft = build_strategy(OmegaConf.to_container(compose(["strategy=sft"]).strategy, resolve=True))
    runs = {name: {"student": student.to(device), "optimizer": optimizer,
                   "params": [p for group in optimizer.param_groups for p in group["params"]],
                   "times": {part: [] for part in PARTS}}
            for name, (student, optimizer) in variants.items()}

    def step(run, batch) -> dict:
        batch = to_device(batch, device)
        marks = [time.perf_counter()]
        with autocast(device, precision):
            loss = sum(distill_terms(sft, run["student"], batch, None).values())
        sync(device)
        marks.append(time.perf_counter())
        loss.backward()
        sync(device)
        marks.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(run["params"], 1.0)
        run["optimizer"].step()
        run["optimizer"].zero_grad(set_to_none=True)
        sync(device)
        marks.append(time.perf_counter())
        return {part: b - a for part, a, b in zip(PARTS, marks[:-1], marks[1:], strict=True)}

    for run in runs.values():
        run["student"].eval()
        with torch.no_grad(), autocast(device, precision):
            terms = distill_terms(sft, run["student"], to_device(bench.batches[0], device), None)
        run["first_loss"] = float(sum(terms.values()))
        run["student"].train()
    for batch in {batch_shape(b): b for b in bench.batches[1:]}.values():
        for run in runs.values():
            step(run, batch)
    for batch in bench.batches[1:]:
        for run in runs.values():
            for part, seconds in step(run, batch).items():
                run["times"][part].append(seconds)

    lengths = [padded_length(b) for b in bench.batches[1:]]
    print(f"pair={bench.cfg.pair.name} task={bench.task.name} device={device} precision={precision} "
          f"batch={bench.cfg.data.batch_size} steps={len(lengths)}, padded lengths {lengths} "
          f"(median s/step; x ref = / {next(iter(runs))}'s step)")
    print(f"{label:<12}{'forward':>9}{'backward':>10}{'optimizer':>11}{'step':>8}{'x ref':>7}"
          f"{'first loss':>12}")
    report, ref = {}, None
    for name, run in runs.items():
        med = {part: statistics.median(t) for part, t in run["times"].items()}
        total = statistics.median([sum(parts) for parts in zip(*run["times"].values(), strict=True)])
        ref = ref or total
        report[name] = {**med, "step": total, "ratio": total / ref, "first_loss": run["first_loss"]}
        print(f"{name:<12}{med['forward']:>9.3f}{med['backward']:>10.3f}{med['optimizer']:>11.3f}"
              f"{total:>8.3f}{total / ref:>7.2f}{run['first_loss']:>12.5f}")
    return report
