"""How task text becomes model text. Training, the probe and every evaluator use these,
so a student is scored on exactly the format it was distilled on."""

from __future__ import annotations

PROMPT_TEMPLATE = "{prompt}\nResponse:"
CLASSIFICATION_TEMPLATE = "{text}\nAnswer:"


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
