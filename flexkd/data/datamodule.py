"""The LightningDataModule: each model gets its own tokenizer's ids, padded per side."""

from __future__ import annotations

import logging

import lightning as L
import torch
from torch.utils.data import DataLoader

from flexkd.data.encoding import (
    encode_classification,
    encode_instruction,
    encode_label_words,
)
from flexkd.data.jsonl import read_jsonl
from flexkd.data.sampling import ResumableBatchSampler
from flexkd.data.tasks import SPLITS, TaskSpec
from flexkd.errors import ConfigError
from flexkd.models import IGNORE_INDEX

log = logging.getLogger(__name__)

REQUIRED_FIELDS = {"classification": ("text", "label"), "instruction": ("prompt", "response")}


class TokenizerMismatchError(ConfigError):
    """Teacher and student tokenizers do not give position-aligned sequences."""


def _pad(seqs: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def collate_side(examples: list, pad_id: int) -> dict[str, torch.Tensor]:
    ids = _pad([e.input_ids for e in examples], pad_id)
    mask = _pad([[1] * len(e.input_ids) for e in examples], 0)
    if isinstance(examples[0].labels, int):
        labels = torch.tensor([e.labels for e in examples], dtype=torch.long)
    else:
        labels = _pad([e.labels for e in examples], IGNORE_INDEX)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class DistillDataModule(L.LightningDataModule):
    """Batches are {"student": side, "teacher": side, "index": (B,)}; a side holds
    input_ids, attention_mask and labels. With one shared tokenizer both sides are the same
    tensors."""

    def __init__(self, task: TaskSpec, student_tokenizer, teacher_tokenizer=None,
                 batch_size: int = 16, eval_batch_size: int | None = None, seed: int = 0,
                 num_workers: int = 0, label_words: bool = False):
        super().__init__()
        self.task = task
        self.tokenizers = {"student": student_tokenizer,
                           "teacher": teacher_tokenizer or student_tokenizer}
        self.shared = teacher_tokenizer is None or teacher_tokenizer is student_tokenizer
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.label_words = label_words and task.format == "classification"
        self.splits: dict[str, list[dict]] = {}

    # -------------------------------------------------------------- encoding
    def _encode(self, row: dict, tokenizer, where: str):
        if self.label_words:
            return encode_label_words(row, tokenizer, self.task.max_length,
                                      self.task.label_names, where)
        if self.task.format == "classification":
            return encode_classification(row, tokenizer, self.task.max_length,
                                         self.task.label_names, where)
        return encode_instruction(row, tokenizer, self.task.max_length, where,
                                  self.task.max_prompt_words, self.task.prompt_template)

    def _load_split(self, split: str) -> list[dict]:
        path = self.task.split_path(split)
        rows = read_jsonl(path, REQUIRED_FIELDS[self.task.format])
        limit = self.task.max_examples.get(split)
        rows = rows[:limit] if limit else rows
        examples, truncated = [], 0
        for i, row in enumerate(rows):
            where = f"{path}:{row['_line']}"
            ex = {"index": i}
            for side in ("student",) if self.shared else ("student", "teacher"):
                ex[side] = self._encode(row, self.tokenizers[side], where)
            ex.setdefault("teacher", ex["student"])
            if len(ex["teacher"].input_ids) != len(ex["student"].input_ids):
                raise TokenizerMismatchError(
                    f"{where}: the teacher's tokenizer gives {len(ex['teacher'].input_ids)} tokens "
                    f"and the student's {len(ex['student'].input_ids)}; token-level feature "
                    "distillation needs position-aligned tokenizers. Use a pair whose tokenizers "
                    "align, or a strategy without token features (sft, logit_kd on a shared vocab)."
                )
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

    # -------------------------------------------------------------- loaders
    def collate(self, examples: list[dict]) -> dict:
        student = collate_side([e["student"] for e in examples],
                               self.tokenizers["student"].pad_token_id)
        teacher = student if self.shared else collate_side(
            [e["teacher"] for e in examples], self.tokenizers["teacher"].pad_token_id)
        index = torch.tensor([e["index"] for e in examples], dtype=torch.long)
        return {"student": student, "teacher": teacher, "index": index}

    def _loader(self, split: str, shuffle: bool, batch_size: int, limit: int | None = None):
        self.setup()
        data = self.splits[split][:limit] if limit else self.splits[split]
        sampler = ResumableBatchSampler(len(data), batch_size, self.seed, shuffle=shuffle)
        return DataLoader(data, batch_sampler=sampler, collate_fn=self.collate,
                          num_workers=self.num_workers)

    def train_dataloader(self):
        return self._loader("train", True, self.batch_size)

    def val_dataloader(self):
        return self._loader("validation", False, self.eval_batch_size)

    def test_dataloader(self):
        return self._loader("test", False, self.eval_batch_size)

    def probe_dataloader(self, examples: int, batch_size: int):
        """The first `examples` training examples in file order (the same for every seed)."""
        return self._loader("train", False, batch_size, limit=examples)
