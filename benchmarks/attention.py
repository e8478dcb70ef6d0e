"""A pair's student trained under each attention kernel, timed side by side.

    python -m benchmarks.attention pair=smollm2_w288 task=bbc_headline \
        pair.student.prune.rank_by=random --precision bf16
    python -m benchmarks.attention ... --kernels sdpa,eager --device cuda

One student per kernel, built from the same spec and seed (`pair.student` with its
`attn_implementation` replaced), each with the fused AdamW `run.py` uses, stepped round-robin
on the same batches (`benchmarks.student_steps`). Prints each kernel's median seconds per step
(forward, backward, optimizer), its ratio to the first kernel's, and its loss on the first
batch without dropout (the kernels compute the same function: those differ by rounding only).
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.speed import Setting, plain
from benchmarks.student_steps import race
from flexkd.models import build_model
from flexkd.module import adamw


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
    variants = {}
    for kernel in args.kernels.split(","):
        torch.manual_seed(0)
        spec = {**plain(bench.cfg.pair.student), "attn_implementation": kernel}
        student = build_model(spec, bench.task.format, bench.student_tok, bench.task.label_names,
                              bench.resolve, label_words=bench.label_words, cache_dir=bench.cache_dir)
        params = [p for p in student.parameters() if p.requires_grad]
        variants[kernel] = (student, adamw(params, lr=1e-5, weight_decay=0.01))
    return race(bench, variants, args.device, args.precision, "kernel")


if __name__ == "__main__":
    main()
