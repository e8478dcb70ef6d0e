"""Turning task rows into token ids, one function per task format."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from flexkd.data.formatting import (
    format_classification_context,
    format_label_choice,
    format_response,
    render_prompt,
)
from flexkd.data.jsonl import DataFileError
from flexkd.models import IGNORE_INDEX

log = logging.getLogger(__name__)


@dataclass
class Encoded:
    input_ids: list[int]
    labels: int | list[int]
    truncated: bool


def _require_string(row: dict, key: str, where: str) -> None:
    value = row.get(key)
    if not isinstance(value, str):
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        raise DataFileError(f"{where}: field {key!r} must be a string, got "
                            f"{type(value).__name__} {shown}")


def classification_label(row: dict, label_names: list[str], where: str) -> int:
    label = row.get("label")
    if isinstance(label, str) and label in label_names:
        return label_names.index(label)
    if isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(label_names):
        return label
    raise DataFileError(f"{where}: label {label!r} is outside the label set {label_names} "
                        f"(use an index 0..{len(label_names) - 1} or one of the names)")


def encode_classification(row: dict, tokenizer, max_length: int, label_names, where: str) -> Encoded:
    _require_string(row, "text", where)
    ids = tokenizer(row["text"], truncation=False)["input_ids"]
    truncated = len(ids) > max_length
    if truncated:
        # Keep the final special token (SEP / </s>) so encoders see a well-formed sequence.
        ids = ids[: max_length - 1] + ids[-1:]
    return Encoded(ids, classification_label(row, label_names, where), truncated)


def encode_instruction(row: dict, tokenizer, max_length: int, where: str,
                       max_prompt_words: int | None = None, prompt_template: str = "plain") -> Encoded:
    for key in ("prompt", "response"):
        _require_string(row, key, where)
    prompt = causal_context(tokenizer, render_prompt(row["prompt"], tokenizer, prompt_template,
                                                     max_prompt_words))
    response = tokenizer(format_response(row["response"], prompt_template),
                         add_special_tokens=False)["input_ids"]
    response = response + [tokenizer.eos_token_id]
    truncated = len(prompt) + len(response) > max_length
    if truncated:
        # Keep the response (what is scored) and the end of the prompt (next to it).
        response = response[: max(max_length // 2, max_length - len(prompt))]
        prompt = keep_end(prompt, max_length - len(response))
    ids = prompt + response
    labels = [IGNORE_INDEX] * len(prompt) + response
    return Encoded(ids, labels, truncated)


def keep_end(context: list[int], keep: int) -> list[int]:
    """The first token (BOS) and the last keep-1 tokens: the end sits next to the target."""
    return context[:1] + context[len(context) - keep + 1:] if keep > 1 else context[:keep]


def causal_context(tokenizer, text: str) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + ids


def label_word_ids(tokenizer, label_names: list[str]) -> list[list[int]]:
    """Token ids of each label's continuation (exactly what lm-eval scores as a choice)."""
    return [tokenizer(format_label_choice(n), add_special_tokens=False)["input_ids"]
            for n in label_names]


def encode_label_words(row: dict, tokenizer, max_length: int, label_names, where: str) -> Encoded:
    """A classification row for a causal LM: context = text + answer cue, target = the label
    word (no EOS, so training matches multiple-choice scoring). Long texts lose their start."""
    _require_string(row, "text", where)
    label = classification_label(row, label_names, where)
    target = label_word_ids(tokenizer, label_names)[label]
    context = causal_context(tokenizer, format_classification_context(row["text"]))
    truncated = len(context) + len(target) > max_length
    if truncated:
        context = keep_end(context, max_length - len(target))
    return Encoded(context + target, [IGNORE_INDEX] * len(context) + target, truncated)
