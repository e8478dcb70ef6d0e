"""OmegaConf resolvers used by conf/ (registered on `import flexkd`)."""

from __future__ import annotations

import os
import sys

from omegaconf import OmegaConf

# Keys that do not change what a run computes (where it caches or writes, how it reports
# progress): they stay out of its directory name and out of its job fingerprint (flexkd.jobs).
NEUTRAL_KEYS = ("cache_dir", "resume", "debug", "output_dir", "trainer.enable_progress_bar",
                "checkpoint.keep_last")


def command_id() -> str:
    """A short stable id of this command's overrides, so rerunning a command finds its run or
    sweep directory again. Computed once per command from argv and passed to launcher
    workers (joblib, submitit) through the environment."""
    from flexkd.storage import content_hash

    if "FLEXKD_COMMAND_ID" not in os.environ:
        args = [a for a in sys.argv[1:] if not a.startswith("-")]
        kept = sorted(a for a in args if not a.lstrip("+~").startswith((*NEUTRAL_KEYS, "hydra.")))
        os.environ["FLEXKD_COMMAND_ID"] = content_hash(kept, length=10)
    return os.environ["FLEXKD_COMMAND_ID"]


if not OmegaConf.has_resolver("flexkd_command_id"):
    OmegaConf.register_new_resolver("flexkd_command_id", command_id)


def cpu_precision() -> str:
    """bf16 autocast where the CPU has native bf16 (AVX512-BF16 / AMX: ~4x faster matmuls),
    else full fp32 (emulated bf16 would be slower)."""
    import torch

    try:
        native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        native = False
    return "bf16-mixed" if native else "32-true"


if not OmegaConf.has_resolver("flexkd_cpu_precision"):
    OmegaConf.register_new_resolver("flexkd_cpu_precision", cpu_precision)
