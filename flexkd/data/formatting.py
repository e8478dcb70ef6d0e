"""How task text becomes model text. Training, the probe and every evaluator use these,
so a student is scored on exactly the format it was distilled on."""

from __future__ import annotations

PROMPT_TEMPLATE = "{prompt}\nResponse:"
CLASSIFICATION_TEMPLATE = "{text}\nAnswer:"


def clip_words(text: str, max_words: int | None) -> str:
    """The first `max_words` words of `text` (all of it for None): for long inputs whose start
    carries the task (an article's lead for its headline), cut before tokenisation."""
    if not max_words:
        return text
    words = text.split()
    return text if len(words) <= max_words else " ".join(words[:max_words])


def format_prompt(prompt: str) -> str:
    """The context a causal LM sees before its response."""
    return PROMPT_TEMPLATE.format(prompt=prompt.strip())


def format_response(response: str) -> str:
    """The continuation a causal LM is trained to produce (EOS is appended by the tokenizer step)."""
    return " " + response.strip()


def format_classification_context(text: str) -> str:
    """Context for scoring a classification example as multiple choice over label words."""
    return CLASSIFICATION_TEMPLATE.format(text=text.strip())


def format_label_choice(label_name: str) -> str:
    return " " + label_name
