"""A pair's student trained with PyTorch's plain and fused AdamW kernels, timed side by side.

    python -m benchmarks.optimizer pair=smollm2_w288 task=bbc_headline --precision bf16

Two copies of one student (same spec and seed), one stepped by AdamW's plain single-tensor
kernel (`torch.optim.AdamW(foreach=False)`, what `run.py` used under bf16-mixed before its
fused optimizer could be clipped there), one by the fused kernel `flexkd.module.adamw` picks,
round-robin on the same batches (`benchmarks.student_steps`). The optimizer column holds
gradient clipping and the AdamW step. The two make the same update (tests/test_optimizer.py).
"""

from __future__ import annotations

import argparse
import copy

import torch

from benchmarks.speed import Setting, plain
from benchmarks.student_steps import race
from flexkd.models import build_model
from flexkd.module import adamw


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides (pair=..., task=...)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per kernel")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    args = parser.parse_args(argv)

    bench = Setting.load(args.overrides, args.steps + 1)
    torch.manual_seed(0)
    student = build_model(plain(bench.cfg.pair.student), bench.task.format, bench.student_tok,
                          bench.task.label_names, bench.resolve, label_words=bench.label_words,
                          cache_dir=bench.cache_dir)
    twin = copy.deepcopy(student)

    def params(model):
        return [p for p in model.parameters() if p.requires_grad]

    fused = adamw(params(twin), lr=1e-5, weight_decay=0.01)
    if not fused.defaults["fused"]:
        raise SystemExit(f"no fused AdamW kernel for {args.device}: nothing to compare")
    variants = {"plain": (student, torch.optim.AdamW(params(student), lr=1e-5, weight_decay=0.01,
                                                     foreach=False)),
                "fused": (twin, fused)}
    return race(bench, variants, args.device, args.precision, "optimizer")


if __name__ == "__main__":
    main()
