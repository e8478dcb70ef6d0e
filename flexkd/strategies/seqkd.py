"""Sequence-level KD (Kim & Rush, 2016): the student is fine-tuned on the teacher's own answers.

At setup the (fine-tuned) teacher answers every training prompt greedily, up to the task's
`max_new_tokens`, and those answers replace the training responses
(`DistillDataModule.replace_responses`); training is then plain SFT on them, with no teacher
in the loop. The answers are generated once per (teacher, task data, generation settings) and
kept as a `flexkd.cache` entry of kind "generations", so every seed and student reuses them.
Instruction tasks only: a classification target is a label, not a sequence.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from pydantic import Field

from flexkd.cache import get_or_build
from flexkd.errors import ConfigError
from flexkd.model_info import ModelInfo
from flexkd.models import IGNORE_INDEX
from flexkd.progress import progress
from flexkd.strategies.base import SetupContext, Strategy

log = logging.getLogger(__name__)

CACHE_KIND = "generations"
CACHE_VERSION = 1
GENERATIONS_FILE = "generations.json"
DEFAULT_MAX_NEW_TOKENS = 32  # when the task sets none
ONLY_INSTRUCTION = ("strategy seqkd trains on the teacher's generated answers: it needs an "
                    "instruction task (e.g. task=bbc_headline); use sft or logit_kd for classification")


class SequenceKD(Strategy):
    name = "seqkd"

    class Knobs(Strategy.Knobs):
        generation_batch_size: int = Field(16, ge=1, description="prompts per generate() call "
                                           "when the teacher's answers are built")
        max_new_tokens: int | None = Field(None, ge=1, description="answer length budget; null: "
                                           "the task's max_new_tokens")

    def __init__(self, **knobs):
        super().__init__(**knobs)
        self.generations_info: dict = {}

    def check_pair(self, student: ModelInfo, teacher: ModelInfo) -> None:
        if "classifier" in (student.kind, teacher.kind):
            raise ConfigError(ONLY_INSTRUCTION)
        super().check_pair(student, teacher)

    def setup(self, ctx: SetupContext) -> None:
        super().setup(ctx)
        data = ctx.datamodule
        if data.task.format != "instruction":
            raise ConfigError(ONLY_INSTRUCTION)
        if ctx.teacher is None:
            raise ConfigError("strategy seqkd needs a teacher to generate the training answers")
        answers, entry = cached_generations(ctx.teacher, data, self.generation_settings(data.task),
                                            ctx.cache_dir, ctx.teacher_fingerprint,
                                            self.generation_batch_size)
        data.replace_responses("train", answers)
        self.generations_info = {"key": entry.key, "path": str(entry.path),
                                 "cache_hit": entry.cache_hit, "answers": len(answers)}

    def generation_settings(self, task) -> dict:
        return {"decoding": "greedy",
                "max_new_tokens": self.max_new_tokens or task.max_new_tokens or DEFAULT_MAX_NEW_TOKENS}

    def diagnostics(self) -> dict:
        return {"generations": self.generations_info}


def prompt_ids(example) -> list[int]:
    """The prompt part of an encoded instruction example (its labels are ignored there)."""
    n = next((i for i, label in enumerate(example.labels) if label != IGNORE_INDEX),
             len(example.labels))
    return list(example.input_ids[:n])


@torch.no_grad()
def generate_answers(teacher, tokenizer, prompts: list[list[int]], max_new_tokens: int,
                     batch_size: int = 16) -> list[str]:
    """Greedy answers of a causal TaskModel to token-id prompts, decoded without special
    tokens; generation stops at EOS. Prompts are left-padded so every answer starts right
    after its prompt."""
    model = teacher.backbone
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    answers: list[str] = []
    for start in progress(range(0, len(prompts), batch_size), desc="teacher answers"):
        chunk = prompts[start:start + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             do_sample=False, num_beams=1, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=pad)
        for row in out[:, width:].tolist():
            if tokenizer.eos_token_id in row:
                row = row[:row.index(tokenizer.eos_token_id)]
            answers.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    model.train(was_training)
    return answers


def cached_generations(teacher, data, settings: dict, cache_dir: str | Path | None,
                       teacher_fingerprint: str, batch_size: int = 16):
    """{train index: the teacher's answer} for every training example, as a `flexkd.cache`
    entry keyed by (teacher, task data, generation settings). Returns (answers, EntryInfo)."""
    from flexkd.storage import default_cache_dir

    data.setup()
    examples = data.splits["train"]
    tokenizer = data.tokenizers["teacher"]
    key = {"teacher": teacher_fingerprint, "data": data.task.fingerprint(), "generation": settings}

    def build(out: Path) -> dict:
        answers = generate_answers(teacher, tokenizer, [prompt_ids(e["teacher"]) for e in examples],
                                   settings["max_new_tokens"], batch_size)
        (out / GENERATIONS_FILE).write_text(json.dumps(answers, ensure_ascii=False, indent=0))
        return {"answers": len(answers), "empty": sum(not a for a in answers)}

    def load(path: Path) -> dict[int, str]:
        answers = json.loads((path / GENERATIONS_FILE).read_text())
        if len(answers) != len(examples):
            raise ValueError(f"{len(answers)} answers for {len(examples)} training examples")
        return dict(enumerate(answers))

    answers, entry = get_or_build(Path(cache_dir) if cache_dir else default_cache_dir(), CACHE_KIND,
                                  key, build, load, version=CACHE_VERSION,
                                  desc="teacher generations")
    log.info("seqkd: %d teacher answers (%s) at %s", len(answers),
             "cache hit" if entry.cache_hit else "generated", entry.path)
    return answers, entry
