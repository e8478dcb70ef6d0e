"""Task specs: where a task's data lives, its format, and how it is cut to size."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from flexkd.errors import ConfigError, DataFileError
from flexkd.storage import file_sha256

FORMATS = ("classification", "instruction")
SPLITS = ("train", "validation", "test")


def read_meta(meta_path: Path) -> dict:
    """A task folder's optional meta.json ({} when absent)."""
    if not meta_path.exists():
        return {}
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise DataFileError(f"{meta_path}: not valid JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(meta, dict):
        raise DataFileError(f"{meta_path}: expected a JSON object, got {type(meta).__name__}")
    return meta


@dataclass
class TaskSpec:
    name: str
    format: str
    data_dir: Path
    label_names: list[str] = field(default_factory=list)
    max_length: int = 128
    max_examples: dict[str, int | None] = field(default_factory=dict)
    max_prompt_words: int | None = None
    prompt_template: str = "plain"  # instruction tasks: plain | chat (flexkd.data.formatting)
    max_new_tokens: int | None = None  # instruction tasks: generation budget (lm-eval)
    # The low-data setting (flexkd.data.subset): the train split is this fraction of its rows,
    # drawn with subset_seed. Validation and test are never cut.
    train_fraction: float = 1.0
    subset_seed: int = 0

    @classmethod
    def from_config(cls, cfg, resolve=lambda s: s) -> TaskSpec:
        if cfg.get("format") not in FORMATS:
            raise ConfigError(f"task {cfg.get('name')!r}: format must be one of {FORMATS}, "
                              f"got {cfg.get('format')!r}")
        data_dir = Path(resolve(str(cfg["data_dir"]))).expanduser().resolve()
        meta_path = data_dir / "meta.json"
        meta = read_meta(meta_path)
        labels = list(cfg.get("label_names") or meta.get("label_names") or [])
        if cfg["format"] == "classification" and len(labels) < 2:
            raise ConfigError(f"task {cfg['name']!r}: a classification task needs label_names "
                              f"(at least 2), in the task config or {meta_path}")
        limits = {s: cfg.get(f"max_{s}_examples") for s in SPLITS}
        return cls(name=cfg["name"], format=cfg["format"], data_dir=data_dir, label_names=labels,
                   max_length=int(cfg.get("max_length", 128)), max_examples=limits,
                   max_prompt_words=cfg.get("max_prompt_words"),
                   prompt_template=cfg.get("prompt_template") or "plain",
                   max_new_tokens=cfg.get("max_new_tokens"))

    def with_train_subset(self, fraction: float, seed: int) -> TaskSpec:
        """This task with its train split cut to `fraction` of its rows (drawn with `seed`)."""
        if not 0.0 < fraction <= 1.0:
            raise ConfigError(f"data.train_fraction={fraction} is outside (0, 1]; use e.g. 0.05 for "
                              "5% of the training set, 1.0 for all of it")
        return replace(self, train_fraction=float(fraction), subset_seed=int(seed))

    def split_path(self, split: str) -> Path:
        return self.data_dir / f"{split}.jsonl"

    def fingerprint(self) -> dict:
        """What identifies this task's data for caching: file hashes, sizes and limits."""
        files = {s: file_sha256(self.split_path(s)) for s in SPLITS if self.split_path(s).exists()}
        return {"name": self.name, "format": self.format, "files": files,
                "labels": self.label_names, "max_length": self.max_length,
                "max_prompt_words": self.max_prompt_words,
                "max_examples": self.max_examples,
                # Only when it changes the encoded text, so existing cache keys stay valid.
                **({"prompt_template": self.prompt_template}
                   if self.prompt_template != "plain" else {}),
                **({"train_subset": {"fraction": self.train_fraction, "seed": self.subset_seed}}
                   if self.train_fraction < 1.0 else {})}
