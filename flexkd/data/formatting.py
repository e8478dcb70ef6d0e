"""How task text becomes model text. Training, the probe and every evaluator use these,
so a student is scored on exactly the format it was distilled on."""

from __future__ import annotations

from flexkd.errors import ConfigError

PROMPT_TEMPLATE = "{prompt}\nResponse:"
CLASSIFICATION_TEMPLATE = "{text}\nAnswer:"
# How an instruction prompt is wrapped (task.prompt_template): `plain` is PROMPT_TEMPLATE;
# `chat` is the tokenizer's own chat template with one user turn and the assistant cue, the
# format instruct models were tuned on (SmolLM2-Instruct answers a plain prompt with a
# sentence, not a headline).
PROMPT_TEMPLATES = ("plain", "chat")


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


def render_prompt(prompt: str, tokenizer=None, template: str = "plain",
                  max_prompt_words: int | None = None) -> str:
    """The instruction context as text, without the BOS that `causal_context` (training) and
    the lm-eval bridge's context prefix put in front: one function for both, so a student is
    scored on the prompt format it was trained on."""
    text = clip_words(prompt, max_prompt_words)
    if template == "plain":
        return format_prompt(text)
    if template == "chat":
        return chat_prompt(tokenizer, text)
    raise ConfigError(f"task.prompt_template={template!r} is not one of: {', '.join(PROMPT_TEMPLATES)}")


def chat_prompt(tokenizer, prompt: str) -> str:
    """One user turn through the tokenizer's chat template, ending with the assistant cue."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", None) or "this tokenizer"
        raise ConfigError(f"task.prompt_template=chat needs a tokenizer with a chat template, and "
                          f"{name} has none; use task.prompt_template=plain")
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt.strip()}],
                                         add_generation_prompt=True, tokenize=False)
    bos = getattr(tokenizer, "bos_token", None)
    if bos and text.startswith(bos):
        text = text[len(bos):]  # templates that write BOS would get it twice
    return text


def format_response(response: str, template: str = "plain") -> str:
    """The continuation a causal LM is trained to produce (EOS is appended by the tokenizer
    step): after `Response:` a space, after a chat template's assistant cue the bare text."""
    return response.strip() if template == "chat" else " " + response.strip()


def format_classification_context(text: str) -> str:
    """Context for scoring a classification example as multiple choice over label words."""
    return CLASSIFICATION_TEMPLATE.format(text=text.strip())


def format_label_choice(label_name: str) -> str:
    return " " + label_name
