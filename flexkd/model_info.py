"""What a strategy's pair rules need of one model: sizes, head kind and tokenizer.

The same record is filled twice: from model *configs* before any weights load
(`flexkd.validation`), and from the loaded models in `Strategy.setup`, so each rule runs
through one code path with one message.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ModelInfo:
    role: str                  # "teacher" / "student"
    name: str
    width: int | None          # hidden size (None: unknown from the config)
    depth: int | None          # transformer blocks
    kind: str = "classifier"   # "classifier" (class logits) or "causal_lm" (token logits)
    vocab: int | None = None   # rows of the LM head, when known without a tokenizer
    tokenizer: str | None = None  # the tokenizer's source; equal sources share one tokenizer
    load_tokenizer: Callable[[], Any] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if self.load_tokenizer is not None:
            self.load_tokenizer = functools.cache(self.load_tokenizer)

    def token_count(self) -> int | None:
        """The size of the output vocabulary: the LM head's rows, else the tokenizer's length."""
        if self.vocab is not None:
            return self.vocab
        return len(self.load_tokenizer()) if self.load_tokenizer is not None else None

    def token_map(self) -> dict | None:
        return self.load_tokenizer().get_vocab() if self.load_tokenizer is not None else None

    @classmethod
    def of_model(cls, role: str, model, tokenizer=None) -> ModelInfo:
        """From a loaded `TaskModel` (and the tokenizer the data module uses for it)."""
        return cls(role, str(getattr(model.config, "name_or_path", "") or role), model.hidden_size,
                   model.num_layers, model.kind,
                   model.num_outputs if model.kind == "causal_lm" else None,
                   getattr(tokenizer, "name_or_path", None) if tokenizer is not None else None,
                   (lambda: tokenizer) if tokenizer is not None else None)
