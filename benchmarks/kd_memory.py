"""Peak memory and time of one logit-KD forward + backward: dense vs chunked, side by side.

    python -m benchmarks.kd_memory                       # N=2048 positions, V=49152, d=576, CPU
    python -m benchmarks.kd_memory --device cuda --rows 8192

The student's logits come from its last hidden rows (N, d) and LM head (V, d), both fp32 and
trainable; the teacher's logits are a stored (N, V) bf16 tensor (what a live bf16 teacher or a
dense store hands over). Variants:

- dense: logits = hidden @ head.T in fp32, then `logit_divergence` (full fp32 logits, softmaxes
  and their gradients alive at once);
- chunked_logits: the same fp32 logits, then `chunked_logit_divergence` over row chunks;
- chunked_head: `chunked_logit_divergence(hidden, ..., student_head=head)`: the (N, V) student
  logits never exist, one chunk at a time is built and rebuilt in backward.

Each variant runs in a fresh process. Peak memory is the growth of the process's resident-set
high-water mark (`getrusage` ru_maxrss) over its resident size just before the step, on CPU, and
`torch.cuda.max_memory_allocated` over the allocation before the step, on CUDA. Inputs (about
0.3 GB at the default size) are excluded from both.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

VARIANTS = ("dense", "chunked_logits", "chunked_head")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_variant(args) -> dict:
    import gc

    import torch

    from flexkd import losses

    def step(hidden, head, teacher):
        if args.variant == "dense":
            return losses.logit_divergence(hidden @ head.T, teacher, args.temperature, args.kind)
        if args.variant == "chunked_logits":
            return losses.chunked_logit_divergence(hidden @ head.T, teacher, args.temperature, args.kind,
                                                   chunk_rows=args.chunk_rows)
        return losses.chunked_logit_divergence(hidden, teacher, args.temperature, args.kind,
                                               student_head=head, chunk_rows=args.chunk_rows)

    torch.manual_seed(0)
    device = torch.device(args.device)
    # Warm-up on tiny inputs: lazy imports and first-call set-up (checkpointing imports
    # torch._dynamo, about 100 MB and 2 s) are not part of the step.
    tiny = torch.randn(4, args.dim, device=device, requires_grad=True)
    step(tiny, torch.randn(8, args.dim, device=device, requires_grad=True),
         torch.randn(4, 8, device=device, dtype=torch.bfloat16)).backward()
    hidden = torch.randn(args.rows, args.dim, device=device).requires_grad_()
    head = (torch.randn(args.vocab, args.dim, device=device) / args.dim ** 0.5).requires_grad_()
    teacher = torch.randn(args.rows, args.vocab, device=device, dtype=torch.bfloat16).mul_(3)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _rss_bytes()
        if _maxrss_bytes() > before + (64 << 20):
            print(f"note: setup peaked {(_maxrss_bytes() - before) / 2**20:.0f} MiB above the "
                  f"baseline; the peak below is a lower bound", file=sys.stderr)

    start, cpu_start = time.perf_counter(), _cpu_seconds()
    loss = step(hidden, head, teacher)
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds, cpu_seconds = time.perf_counter() - start, _cpu_seconds() - cpu_start
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda" else _maxrss_bytes()) - before
    return {"variant": args.variant, "loss": loss.item(), "grad_norm": head.grad.norm().item(),
            "peak_bytes": peak, "seconds": seconds, "cpu_seconds": cpu_seconds}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2048, help="positions N")
    parser.add_argument("--vocab", type=int, default=49152, help="vocabulary V (SmolLM2: 49152)")
    parser.add_argument("--dim", type=int, default=576, help="hidden size d (SmolLM2-135M: 576)")
    parser.add_argument("--chunk-rows", type=int, default=256)
    parser.add_argument("--kind", default="forward")
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--variant", choices=VARIANTS, help="internal: run one variant in this process")
    args = parser.parse_args(argv)

    if args.variant:
        print(json.dumps(run_variant(args)))
        return

    passthrough = [f"--rows={args.rows}", f"--vocab={args.vocab}", f"--dim={args.dim}",
                   f"--chunk-rows={args.chunk_rows}", f"--kind={args.kind}",
                   f"--temperature={args.temperature}", f"--device={args.device}"]
    rows = []
    for variant in VARIANTS:
        out = subprocess.run([sys.executable, "-m", "benchmarks.kd_memory", *passthrough,
                              f"--variant={variant}"], capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"{variant} failed:\n{out.stderr}")
        sys.stderr.write(out.stderr)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))

    logit_mib = args.rows * args.vocab * 4 / 2**20
    print(f"logit KD ({args.kind}, T={args.temperature}) forward + backward, N={args.rows} "
          f"V={args.vocab} d={args.dim}, chunk_rows={args.chunk_rows}, {args.device}; "
          f"one fp32 copy of the (N, V) logits = {logit_mib:.0f} MiB")
    print(f"{'variant':<16}{'peak MiB':>10}{'x dense':>9}{'wall s':>9}{'x dense':>9}{'cpu s':>9}"
          f"{'x dense':>9}{'loss':>12}{'|grad head|':>13}")
    dense = rows[0]
    for r in rows:
        mem_ratio, time_ratio = r["peak_bytes"] / dense["peak_bytes"], r["seconds"] / dense["seconds"]
        cpu_ratio = r["cpu_seconds"] / dense["cpu_seconds"]
        print(f"{r['variant']:<16}{r['peak_bytes'] / 2**20:>10.0f}{mem_ratio:>9.2f}{r['seconds']:>9.2f}"
              f"{time_ratio:>9.2f}{r['cpu_seconds']:>9.2f}{cpu_ratio:>9.2f}{r['loss']:>12.6f}"
              f"{r['grad_norm']:>13.6f}")
    print("cpu s: user + system time of the step (on CPU, less sensitive than wall time to other load)")


if __name__ == "__main__":
    main()
