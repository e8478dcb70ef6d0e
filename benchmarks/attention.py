"""A pair's student trained under each attention kernel, timed side by side.

    python -m benchmarks.attention pair=smollm2_w288 task=bbc_headline \
        pair.student.prune.rank_by=random --precision bf16
    python -m benchmarks.attention ... --kernels sdpa,eager --device cuda

One student per kernel, built from the same spec and seed (`pair.student` with its
`attn_implementation` replaced), steps the student's own loss (`sft`; a kernel changes the
student's compute alike under every strategy) on the same batches round-robin (A B A B ...),
after one untimed step of each at every batch shape. Prints each kernel's median seconds per
step (forward, backward, optimizer), its ratio to the first kernel's, and its loss on the first
batch without dropout (the kernels compute the same function: those differ by rounding only).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from omegaconf import OmegaConf

from benchmarks.speed import Setting, autocast, batch_shape, compose, padded_length, plain, sync, to_device
from flexkd.models import build_model
from flexkd.module import adamw
from flexkd.step import distill_terms
from flexkd.strategies import build_strategy

PARTS = ("forward", "backward", "optimizer")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides (pair=..., task=...)")
    parser.add_argument("--kernels", default="sdpa,eager", help="transformers attn_implementation "
                        "names; the first is the reference")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per kernel")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    args = parser.parse_args(argv)

    bench = Setting.load(args.overrides, args.steps + 1)
    cfg, task = bench.cfg, bench.task
    sft = build_strategy(OmegaConf.to_container(compose(["strategy=sft"]).strategy, resolve=True))
    runs = {}
    for kernel in args.kernels.split(","):
        torch.manual_seed(0)
        spec = {**plain(cfg.pair.student), "attn_implementation": kernel}
        student = build_model(spec, task.format, bench.student_tok, task.label_names, bench.resolve,
                              label_words=bench.label_words, cache_dir=bench.cache_dir)
        student.to(args.device).train()
        params = [p for p in student.parameters() if p.requires_grad]
        runs[kernel] = {"student": student, "params": params,
                        "optimizer": adamw(params, lr=1e-5, weight_decay=0.01),
                        "times": {part: [] for part in PARTS}}

    def step(run, batch) -> dict:
        batch = to_device(batch, args.device)
        marks = [time.perf_counter()]
        with autocast(args.device, args.precision):
            loss = sum(distill_terms(sft, run["student"], batch, None).values())
        sync(args.device)
        marks.append(time.perf_counter())
        loss.backward()
        sync(args.device)
        marks.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(run["params"], 1.0)
        run["optimizer"].step()
        run["optimizer"].zero_grad(set_to_none=True)
        sync(args.device)
        marks.append(time.perf_counter())
        return {part: b - a for part, a, b in zip(PARTS, marks[:-1], marks[1:], strict=True)}

    for run in runs.values():  # same weights, no dropout: the kernels' losses differ by rounding
        run["student"].eval()
        with torch.no_grad(), autocast(args.device, args.precision):
            terms = distill_terms(sft, run["student"], to_device(bench.batches[0], args.device), None)
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
    print(f"pair={cfg.pair.name} task={task.name} device={args.device} precision={args.precision} "
          f"batch={cfg.data.batch_size} steps={args.steps}, padded lengths {lengths} "
          f"(median s/step; x ref = / {next(iter(runs))}'s step)")
    print(f"{'kernel':<12}{'forward':>9}{'backward':>10}{'optimizer':>11}{'step':>8}{'x ref':>7}"
          f"{'first loss':>12}")
    report, ref = {}, None
    for kernel, run in runs.items():
        med = {part: statistics.median(t) for part, t in run["times"].items()}
        total = statistics.median([sum(parts) for parts in zip(*run["times"].values(), strict=True)])
        ref = ref or total
        report[kernel] = {**med, "step": total, "ratio": total / ref, "first_loss": run["first_loss"]}
        print(f"{kernel:<12}{med['forward']:>9.3f}{med['backward']:>10.3f}{med['optimizer']:>11.3f}"
              f"{total:>8.3f}{total / ref:>7.2f}{run['first_loss']:>12.5f}")
    return report


if __name__ == "__main__":
    main()
