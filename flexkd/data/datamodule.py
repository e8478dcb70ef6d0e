"""The LightningDataModule: each model gets its own tokenizer's ids, padded per side. When the two
tokenizers differ, every example also carries its character-span alignment (flexkd.data.alignment)
and batches carry the group ids under "alignment"."""

from __future__ import annotations

import logging

import lightning as L
import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader

from flexkd.data.alignment import (
    POOLS,
    AlignmentError,
    AlignmentStats,
    align_spans,
    collate_alignment,
)
from flexkd.data.encoding import (
    encode_classification,
    encode_instruction,
    encode_label_words,
)
from flexkd.data.jsonl import read_jsonl
from flexkd.data.sampling import ResumableBatchSampler
from flexkd.data.step_units import StepExamples, StepUnitsBatchSampler, add_units, example_units
from flexkd.data.subset import subset_indices
from flexkd.data.tasks import SPLITS, TaskSpec
from flexkd.errors import ConfigError
from flexkd.models import IGNORE_INDEX

log = logging.getLogger(__name__)

REQUIRED_FIELDS = {"classification": ("text", "label"), "instruction": ("prompt", "response")}

# The old name of the tokenizer-mismatch error; check_alignment raises it (a ConfigError).
TokenizerMismatchError = AlignmentError


def _pad(seqs: list[list[int]], value: int) -> torch.Tensor:
    return pad_sequence([torch.tensor(s, dtype=torch.long) for s in seqs], batch_first=True,
                        padding_value=value)


def collate_side(examples: list, pad_id: int) -> dict[str, torch.Tensor]:
    ids = _pad([e.input_ids for e in examples], pad_id)
    mask = pad_sequence([torch.ones(len(e.input_ids), dtype=torch.long) for e in examples],
                        batch_first=True, padding_value=0)
    if isinstance(examples[0].labels, int):
        labels = torch.tensor([e.labels for e in examples], dtype=torch.long)
    else:
        labels = _pad([e.labels for e in examples], IGNORE_INDEX)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class DistillDataModule(L.LightningDataModule):
    """Batches are {"student": side, "teacher": side, "index": (B,)}; a side holds
    input_ids, attention_mask and labels. With one shared tokenizer both sides are the same
    tensors. With two tokenizers a batch also holds "alignment": {"student": (B, Ls),
    "teacher": (B, Lt) group ids (-1 = none), "n_groups": G, "pool": how groups are pooled} -
    or None when a tokenizer has no offset mapping (not fast), which only token-comparing
    strategies refuse. `alignment_pool` "auto": the last token of a group for causal LMs (it
    has read the whole group), the mean for encoders.
    `bucket_by_length`: every loader batches examples of similar length (less padding).
    Training batches also hold "units" and "step_units": the rows each row-mean loss term has in
    this batch and in its whole optimizer step (flexkd.data.step_units)."""

    def __init__(self, task: TaskSpec, student_tokenizer, teacher_tokenizer=None,
                 batch_size: int = 16, eval_batch_size: int | None = None, seed: int = 0,
                 num_workers: int = 0, label_words: bool = False, bucket_by_length: bool = True,
                 alignment_pool: str = "auto"):
        super().__init__()
        if alignment_pool not in (*POOLS, "auto"):
            raise ConfigError(f"alignment.pool={alignment_pool!r}; use one of {(*POOLS, 'auto')}")
        self.task = task
        self.tokenizers = {"student": student_tokenizer,
                           "teacher": teacher_tokenizer or student_tokenizer}
        self.shared = teacher_tokenizer is None or teacher_tokenizer is student_tokenizer
        # Alignment needs offsets, which only fast tokenizers report.
        self.alignable = not self.shared and all(t.is_fast for t in self.tokenizers.values())
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.label_words = label_words and task.format == "classification"
        self.bucket_by_length = bucket_by_length
        self.splits: dict[str, list[dict]] = {}
        causal = self.label_words or task.format == "instruction"
        self.alignment_pool = (("last" if causal else "mean") if alignment_pool == "auto"
                               else alignment_pool)
        self.responses: dict[str, dict[int, str]] = {}  # replace_responses: split -> index -> text
        self.available: dict[str, int] = {}  # split -> rows before the low-data subset

    # -------------------------------------------------------------- encoding
    def _encode(self, row: dict, tokenizer, where: str):
        spans = self.alignable
        if self.label_words:
            return encode_label_words(row, tokenizer, self.task.max_length,
                                      self.task.label_names, where, spans=spans)
        if self.task.format == "classification":
            return encode_classification(row, tokenizer, self.task.max_length,
                                         self.task.label_names, where, spans=spans)
        return encode_instruction(row, tokenizer, self.task.max_length, where,
                                  self.task.max_prompt_words, spans=spans,
                                  prompt_template=self.task.prompt_template)

    def _example(self, i: int, row: dict, where: str) -> dict:
        ex = {"index": i, "where": where}
        for side in ("student",) if self.shared else ("student", "teacher"):
            ex[side] = self._encode(row, self.tokenizers[side], where)
        ex.setdefault("teacher", ex["student"])
        if self.alignable:
            ex["alignment"] = align_spans(ex["student"].spans, ex["teacher"].spans,
                                          ex["student"].text)
        return ex

    def _rows(self, split: str) -> list[dict]:
        rows = read_jsonl(self.task.split_path(split), REQUIRED_FIELDS[self.task.format])
        limit = self.task.max_examples.get(split)
        rows = rows[:limit] if limit else rows
        self.available[split] = len(rows)
        if split == "train" and self.task.train_fraction < 1.0:  # the low-data setting
            rows = [rows[i] for i in subset_indices(len(rows), self.task.train_fraction,
                                                   self.task.subset_seed)]
        # Indices are positions in the (sub)set: the teacher store and responses are keyed so.
        swap = self.responses.get(split, {})
        return [{**row, "response": swap[i]} if i in swap else row for i, row in enumerate(rows)]

    def replace_responses(self, split: str, responses: dict[int, str]) -> None:
        """Train on other answers (e.g. a teacher's generations, flexkd.strategies.seqkd):
        example i of `split` gets `responses[i]` as its response text; the split is encoded
        again (both tokenizers) so batches carry the new targets."""
        if self.task.format != "instruction":
            raise ConfigError(f"replace_responses: task {self.task.name!r} is a {self.task.format} "
                              "task; only instruction tasks have responses")
        self.responses[split] = dict(responses)
        self.splits[split] = self._load_split(split)

    def _load_split(self, split: str) -> list[dict]:
        path = self.task.split_path(split)
        examples, truncated = [], 0
        for i, row in enumerate(self._rows(split)):
            ex = self._example(i, row, f"{path}:{row['_line']}")
            truncated += ex["student"].truncated
            examples.append(ex)
        if truncated:
            log.info("%s/%s: truncated %d of %d examples to max_length=%d", self.task.name, split,
                     truncated, len(examples), self.task.max_length)
        return examples

    def setup(self, stage: str | None = None) -> None:
        for split in SPLITS:
            if split not in self.splits:
                self.splits[split] = self._load_split(split)

    # -------------------------------------------------------------- alignment
    def alignment_sample(self, examples: int = 64, split: str = "train") -> list[dict]:
        """The first `examples` examples of `split`, encoded and aligned, without loading the
        rest (for pre-flight `check_alignment`). Needs two different, fast tokenizers."""
        if not self.alignable:
            return []
        path = self.task.split_path(split)
        return [self._example(i, row, f"{path}:{row['_line']}")
                for i, row in enumerate(self._rows(split)[:examples])]

    def alignment_stats(self, split: str = "train") -> AlignmentStats | None:
        """Alignment statistics over a split (None with one shared or a slow tokenizer)."""
        if not self.alignable:
            return None
        self.setup()
        stats = AlignmentStats()
        for ex in self.splits[split]:
            stats.add(ex["alignment"])
        return stats

    # -------------------------------------------------------------- loaders
    def collate(self, examples: list[dict]) -> dict:
        student = collate_side([e["student"] for e in examples],
                               self.tokenizers["student"].pad_token_id)
        teacher = student if self.shared else collate_side(
            [e["teacher"] for e in examples], self.tokenizers["teacher"].pad_token_id)
        index = torch.tensor([e["index"] for e in examples], dtype=torch.long)
        batch = {"student": student, "teacher": teacher, "index": index}
        if not self.shared:
            batch["alignment"] = (collate_alignment([e["alignment"] for e in examples],
                                                    self.alignment_pool)
                                  if self.alignable else None)
        if "step_units" in examples[0]:  # training: rows of this batch and of its optimizer step
            batch["units"] = add_units(example_units(e, self.shared) for e in examples)
            batch["step_units"] = examples[0]["step_units"]
        return batch

    def _loader(self, split: str, shuffle: bool, batch_size: int, limit: int | None = None):
        self.setup()
        data = self.splits[split][:limit] if limit else self.splits[split]
        # Batches of similar lengths pad less (flexkd.data.sampling); the longer side counts.
        lengths = [max(len(e["student"].input_ids), len(e["teacher"].input_ids)) for e in data]
        options = dict(shuffle=shuffle, lengths=lengths if self.bucket_by_length else None)
        if shuffle:  # training: batches carry their optimizer step's row counts (step_units.py)
            units = [example_units(e, self.shared) for e in data]
            sampler = StepUnitsBatchSampler(units, self.accumulate_grad_batches(), batch_size,
                                            self.seed, **options)
            data = StepExamples(data)
        else:
            sampler = ResumableBatchSampler(len(data), batch_size, self.seed, **options)
        # Its own generator: creating a loader's iterator (every epoch, every validation) would
        # otherwise draw from the global RNG, and a run resumed at an epoch's end would draw
        # once less than the uninterrupted one (other dropout masks from then on).
        return DataLoader(data, batch_sampler=sampler, collate_fn=self.collate,
                          num_workers=self.num_workers,
                          generator=torch.Generator().manual_seed(self.seed))

    def accumulate_grad_batches(self) -> int:
        """Micro-batches per optimizer step: the attached trainer's, else 1."""
        return int(getattr(self.trainer, "accumulate_grad_batches", 1) or 1)

    def train_dataloader(self):
        return self._loader("train", True, self.batch_size)

    def val_dataloader(self):
        return self._loader("validation", False, self.eval_batch_size)

    def test_dataloader(self):
        return self._loader("test", False, self.eval_batch_size)

    def probe_dataloader(self, examples: int, batch_size: int):
        """The first `examples` training examples of the file (the same for every seed); in
        file order unless bucketed by length."""
        return self._loader("train", False, batch_size, limit=examples)
