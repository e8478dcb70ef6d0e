"""What a strategy's pair rules need of one model: sizes, head kind and tokenizer.

The same record is filled twice: from model *configs* before any weights load
(`flexkd.validation`), and from the loaded models in `Strategy.setup`, so each rule runs
through one code path with one message.
"""

from __future__ import annotations

import difflib
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from flexkd.errors import ConfigError, UserError
from flexkd.schema import STRICT, first_line, validate


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
        return cls(role, str(getattr(model.config, "name_or_path", "") or "model"), model.hidden_size,
                   model.num_layers, model.kind,
                   model.num_outputs if model.kind == "causal_lm" else None,
                   getattr(tokenizer, "name_or_path", None) if tokenizer is not None else None,
                   (lambda: tokenizer) if tokenizer is not None else None)

    @classmethod
    def from_spec(cls, role: str, m: dict, resolve_at: Callable[[str, str], str],
                  kind: str = "classifier") -> ModelInfo:
        """From a pair's model spec, reading its config only (a `path`'s config.json, or the
        `init` dict); no weights load. `resolve_at(key, source)` gives a local path, or a
        ConfigError naming `key`."""
        from transformers import AutoConfig

        key = f"pair.{role}"
        if m.get("prune"):
            return cls._from_prune_spec(role, m, resolve_at, kind)
        if m.get("path"):
            local = resolve_at(f"{key}.path", m["path"])
            try:
                config = AutoConfig.from_pretrained(local)
            except (OSError, ValueError, KeyError) as e:
                offline = os.environ.get("HF_HUB_OFFLINE") == "1" and not Path(local).exists()
                hint = ("; a hub name needs the Hugging Face Hub: set HF_HUB_OFFLINE=0 where it "
                        "is reachable, or use a local directory or asset:<name>" if offline else "")
                raise ConfigError(f"{key}.path={m['path']!r}: cannot read its model config "
                                  f"({first_line(e)}){hint}") from None
            depth = getattr(config, "num_hidden_layers", None)
            keep = m.get("keep_layers")
            if keep is not None and depth is not None:
                if not keep or any(not 0 <= i < depth for i in keep) or sorted(set(keep)) != list(keep):
                    raise ConfigError(f"{key}.keep_layers={list(keep)} must be increasing block "
                                      f"indices in 0..{depth - 1} ({m['path']} has {depth} blocks)")
                depth = len(keep)
            vocab = getattr(config, "vocab_size", None)
        else:
            config = _init_config(key, dict(m.get("init") or {}))
            depth = getattr(config, "num_hidden_layers", None)
            vocab = (m.get("init") or {}).get("vocab_size")  # else len(tokenizer): models._backbone
        width = getattr(config, "hidden_size", None)
        return cls(role, str(m.get("name")), width if isinstance(width, int) else None,
                   depth if isinstance(depth, int) else None, kind, vocab,
                   m.get("tokenizer") or m.get("path"), lambda: _tokenizer(role, m, resolve_at))


    @classmethod
    def _from_prune_spec(cls, role: str, m: dict, resolve_at, kind: str) -> ModelInfo:
        """A pruned student's width/depth from its plan and the source's config; its vocabulary
        and tokenizer are the source's (pruning keeps every token)."""
        from flexkd.pruning import pruned_shape

        key = f"pair.{role}.prune"
        source = m["prune"]["from"]
        try:
            config, width, depth = pruned_shape(m["prune"], lambda s: resolve_at(f"{key}.from", s))
        except ConfigError as e:
            text = str(e)
            where = f"pair.{role}." if text.startswith("prune") else f"{key}: "
            raise ConfigError(text if text.startswith("pair.") else where + text) from None
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(f"{key}.from={source!r}: cannot read its model config "
                              f"({first_line(e)})") from None
        spec = {**m, "tokenizer": m.get("tokenizer") or source}
        return cls(role, str(m.get("name")), width, depth, kind, getattr(config, "vocab_size", None),
                   spec["tokenizer"], lambda: _tokenizer(role, spec, resolve_at))


class InitSizes(BaseModel):
    """Sizes in a random-init spec that must be positive integers (other keys pass through)."""

    model_config = {**STRICT, "extra": "ignore"}
    hidden_size: int = Field(1, ge=1)
    num_hidden_layers: int = Field(1, ge=1)
    num_attention_heads: int = Field(1, ge=1)
    num_key_value_heads: int = Field(1, ge=1)
    intermediate_size: int = Field(1, ge=1)
    vocab_size: int = Field(1, ge=1)
    max_position_embeddings: int = Field(1, ge=1)


def _init_config(key: str, init: dict):
    from transformers import CONFIG_MAPPING, AutoConfig

    model_type = init.pop("model_type")
    validate(InitSizes, init, prefix=f"{key}.init")
    try:
        config = AutoConfig.for_model(model_type, **init)
    except (ValueError, KeyError, TypeError) as e:
        if model_type not in CONFIG_MAPPING:
            close = difflib.get_close_matches(str(model_type), list(CONFIG_MAPPING.keys()), n=3)
            maybe = f"; did you mean {', '.join(close)}?" if close else " (e.g. bert, llama)"
            raise ConfigError(f"{key}.init.model_type={model_type!r} is not a transformers "
                              f"model type{maybe}") from None
        raise ConfigError(f"{key}.init: {first_line(e)}") from None
    heads, width = getattr(config, "num_attention_heads", None), getattr(config, "hidden_size", None)
    if isinstance(width, int) and isinstance(heads, int) and heads > 0 and width % heads:
        raise ConfigError(f"{key}.init.hidden_size={width} is not a multiple of "
                          f"num_attention_heads={heads}")
    return config


def _tokenizer(role: str, m: dict, resolve_at):
    from flexkd.models import load_tokenizer

    key = f"pair.{role}.{'tokenizer' if m.get('tokenizer') else 'path'}"
    source = m.get("tokenizer") or m.get("path")
    local = resolve_at(key, source)
    try:
        return load_tokenizer({**m, "tokenizer": local}, lambda s: s)
    except UserError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{key}={source!r}: cannot load the tokenizer ({first_line(e)})") from None
