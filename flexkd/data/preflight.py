"""Pre-flight alignment: before any teacher work, a strategy that compares teacher and student
tokens on a pair with two tokenizers gets a sample of the training data aligned, so a pair that
cannot be aligned fails in seconds, in one line naming an example and both tokenizations."""

from __future__ import annotations

from flexkd.data.alignment import AlignmentStats, check_alignment
from flexkd.data.datamodule import DistillDataModule
from flexkd.data.tasks import TaskSpec

SAMPLE_EXAMPLES = 64  # the first training examples checked; enough to meet a bad tokenizer


def check_pair_alignment(task_cfg: dict, student_tok, teacher_tok, resolve=lambda s: s, *,
                         label_words: bool = False, examples: int = SAMPLE_EXAMPLES,
                         max_dropped_share: float = 0.1) -> AlignmentStats:
    """Align the first `examples` training examples of the task exactly as the run will encode
    them; raise AlignmentError (a ConfigError) on the first example that does not align, or when
    a tokenizer has no offsets. Returns the sample's statistics."""
    task = TaskSpec.from_config(task_cfg, resolve)
    data = DistillDataModule(task, student_tok, teacher_tok, label_words=label_words)
    sample = data.alignment_sample(examples) if data.alignable else []
    return check_alignment(sample, student_tok, teacher_tok, max_dropped_share)
