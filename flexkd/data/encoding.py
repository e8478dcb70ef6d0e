"""Turning task rows into token ids, one function per task format."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from flexkd.data.alignment import OUTSIDE, SPECIAL
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
    # Only when asked (`spans=True`, tokenizers differ): the characters of `text` each token
    # covers, or SPECIAL / OUTSIDE (see flexkd.data.alignment).
    spans: list[tuple[int, int]] | None = None
    text: str | None = None


def tokenize(tokenizer, text: str, spans: bool, **kwargs) -> tuple[list[int], list | None]:
    """Token ids of `text`, and with `spans` each token's character span (SPECIAL for special
    tokens). Without `spans` the tokenizer is called exactly as it always was."""
    if not spans:
        return tokenizer(text, **kwargs)["input_ids"], None
    enc = tokenizer(text, return_offsets_mapping=True, return_special_tokens_mask=True, **kwargs)
    marks = [SPECIAL if special else (int(a), int(b)) for (a, b), special
             in zip(enc["offset_mapping"], enc["special_tokens_mask"], strict=True)]
    return enc["input_ids"], marks


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


def encode_classification(row: dict, tokenizer, max_length: int, label_names, where: str,
                          spans: bool = False) -> Encoded:
    _require_string(row, "text", where)
    ids, marks = tokenize(tokenizer, row["text"], spans, truncation=False)
    truncated = len(ids) > max_length
    if truncated:
        # Keep the final special token (SEP / </s>) so encoders see a well-formed sequence.
        ids = ids[: max_length - 1] + ids[-1:]
        marks = None if marks is None else marks[: max_length - 1] + marks[-1:]
    return Encoded(ids, classification_label(row, label_names, where), truncated, marks,
                   row["text"] if spans else None)


def encode_instruction(row: dict, tokenizer, max_length: int, where: str,
                       max_prompt_words: int | None = None, spans: bool = False,
                       prompt_template: str = "plain") -> Encoded:
    """Prompt then response + EOS; labels on the response only. With `spans`, only the response
    is aligned across tokenizers (its text is `text`; prompt tokens are OUTSIDE)."""
    for key in ("prompt", "response"):
        _require_string(row, key, where)
    prompt = causal_context(tokenizer, render_prompt(row["prompt"], tokenizer, prompt_template,
                                                     max_prompt_words))
    response_text = format_response(row["response"], prompt_template)
    response, marks = tokenize(tokenizer, response_text, spans, add_special_tokens=False)
    response = response + [tokenizer.eos_token_id]
    marks = None if marks is None else marks + [SPECIAL]
    truncated = len(prompt) + len(response) > max_length
    if truncated:
        # Keep the response (what is scored) and the end of the prompt (next to it).
        response = response[: max(max_length // 2, max_length - len(prompt))]
        marks = None if marks is None else marks[: len(response)]
        prompt = keep_end(prompt, max_length - len(response))
    ids = prompt + response
    labels = [IGNORE_INDEX] * len(prompt) + response
    marks = None if marks is None else [OUTSIDE] * len(prompt) + marks
    return Encoded(ids, labels, truncated, marks, response_text if spans else None)


def keep_end(context: list[int], keep: int) -> list[int]:
    """The first token (BOS) and the last keep-1 tokens: the end sits next to the target."""
    return context[:1] + context[len(context) - keep + 1:] if keep > 1 else context[:keep]


def causal_context(tokenizer, text: str) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + ids


def causal_context_spans(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """causal_context with each token's span in `text` (the BOS is SPECIAL)."""
    ids, marks = tokenize(tokenizer, text, True, add_special_tokens=False)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + ids, [SPECIAL] * len(bos) + marks


def label_word_ids(tokenizer, label_names: list[str]) -> list[list[int]]:
    """Token ids of each label's continuation (exactly what lm-eval scores as a choice)."""
    return [tokenizer(format_label_choice(n), add_special_tokens=False)["input_ids"]
            for n in label_names]


def encode_label_words(row: dict, tokenizer, max_length: int, label_names, where: str,
                       spans: bool = False) -> Encoded:
    """A classification row for a causal LM: context = text + answer cue, target = the label
    word (no EOS, so training matches multiple-choice scoring). Long texts lose their start.
    With `spans`, context and label word are aligned as one text (context text + choice)."""
    _require_string(row, "text", where)
    label = classification_label(row, label_names, where)
    context_text = format_classification_context(row["text"])
    if spans:
        context, marks = causal_context_spans(tokenizer, context_text)
        choice = format_label_choice(label_names[label])
        target, target_marks = tokenize(tokenizer, choice, True, add_special_tokens=False)
        shift = len(context_text)
        marks = marks + [m if m[0] < 0 else (m[0] + shift, m[1] + shift) for m in target_marks]
    else:
        target = label_word_ids(tokenizer, label_names)[label]
        context, marks = causal_context(tokenizer, context_text), None
    truncated = len(context) + len(target) > max_length
    if truncated:
        kept = keep_end(list(range(len(context))), max_length - len(target))
        if marks is not None:
            marks = [marks[k] for k in kept] + marks[len(context):]
        context = [context[k] for k in kept]
    return Encoded(context + target, [IGNORE_INDEX] * len(context) + target, truncated, marks,
                   context_text + choice if spans else None)
