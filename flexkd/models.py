"""Teacher and student models: one wrapper per head kind, built from a config spec.

A spec names a source (hub name, local directory, `asset:<name>`) or an architecture for
random init. The task decides the head: classification -> a classifier on the masked mean of
the last hidden state (encoder or decoder backbone); instruction -> a causal LM.

Layer indices follow Hugging Face `hidden_states`: 0 is the embedding output, n (the number
of layers) the last layer, negative indices count from the end (-1 = last). For Llama-family
models in transformers 5.x (and GPT-2) the last entry is taken after the final norm (the LM
head's input); a spec's `final_norm_state: pre` makes it the last block's own output, before
that norm (where the massive-activation dims live), read by a forward pre-hook on the norm.
"""

from __future__ import annotations

import abc
import inspect
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flexkd.errors import ConfigError
from flexkd.losses import TeacherTopK

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
CLASSIFIER_FILE = "flexkd_classifier.json"
HEAD_WEIGHTS = "flexkd_head.pt"
FINAL_NORM_STATES = ("post", "pre")
# The final norm of decoder backbones: Llama/Mistral/Qwen `norm`, GPT-2 `ln_f`, OPT/Phi others.
FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm")


@dataclass
class ModelOutputs:
    """What a strategy sees of one forward pass.

    `hidden` maps a normalised layer index to (B, L, d); `kd_logits` holds the rows that logit
    KD compares: (B, C) class logits, or (N, V) logits at the positions that predict response
    tokens. `logits` is (B, C) for a classifier; a causal LM's (B, L, V) logits are there only
    when asked for (`CausalLM.forward`). `loss` is the task cross-entropy (None when no labels
    were given).

    Causal LMs also give `kd_hidden`, the (N, d) last hidden state at those positions, and
    `kd_head`, the (V, d) LM-head weight: chunked logit KD recomputes logits from them, which
    is exact only when `CausalLM.linear_head_problem()` is None. A teacher-output store may
    give `kd_topk` (its top-k per KD row) instead of `kd_logits`.
    """

    kd_logits: torch.Tensor | None
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    kd_hidden: torch.Tensor | None = None
    kd_head: torch.Tensor | None = None
    kd_topk: TeacherTopK | None = None
    # True when `hidden` holds only the request's views (OutputRequest.apply).
    reduced: bool = False


def response_positions(labels: torch.Tensor) -> torch.Tensor:
    """(B, L) causal labels -> (B, L) mask of positions whose logits predict a response token."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return mask


class TaskModel(nn.Module, abc.ABC):
    """Common surface of the two heads: widths, depth, layer indexing, forward."""

    kind: str
    final_norm_state = "post"  # what the last layer's entry in `hidden` is (FINAL_NORM_STATES)

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def use_final_norm_state(self, state: str) -> TaskModel:
        """'pre': the last layer (index num_layers, -1) is read before the final norm."""
        if state not in FINAL_NORM_STATES:
            raise ConfigError(f"final_norm_state={state!r} is not one of: {', '.join(FINAL_NORM_STATES)}")
        if state != self.final_norm_state:
            if state == "post":
                self._prenorm_hook.remove()
            else:
                norm = final_norm(self.backbone)
                if norm is None:
                    raise ConfigError(f"final_norm_state=pre: {type(self.backbone).__name__} has no "
                                      f"final norm ({', '.join(FINAL_NORM_NAMES)}); its last hidden "
                                      "state is already the last block's output; use post")
                self._prenorm_hook = norm.register_forward_pre_hook(self._capture_prenorm)
            self.final_norm_state = state
        self._prenorm = None
        return self

    def _capture_prenorm(self, module, args) -> None:
        self._prenorm = args[0]

    @property
    def config(self):
        return self.backbone.config

    @property
    def attention_kernel(self) -> str | None:
        """The attention implementation transformers runs (eager, sdpa, ...)."""
        return getattr(self.config, "_attn_implementation", None)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    @abc.abstractmethod
    def num_outputs(self) -> int:
        """Classes for a classifier, vocabulary size for a causal LM."""

    def layer_index(self, layer: int) -> int:
        """Normalise a layer index into [0, num_layers]; out of range is a ConfigError."""
        n = self.num_layers
        idx = layer + n + 1 if layer < 0 else layer
        if not 0 <= idx <= n:
            raise ConfigError(
                f"layer {layer} is out of range for a model with {n} layers "
                f"(valid: 0..{n} or -{n + 1}..-1; 0 is the embedding output, -1 the last layer)"
            )
        return idx

    def _backbone_states(self, input_ids, attention_mask, **kw):
        return self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                             output_hidden_states=True, **kw)

    @abc.abstractmethod
    def forward(self, inputs: dict[str, torch.Tensor], layers=(), all_logits: bool = False) -> ModelOutputs:
        """inputs: input_ids, attention_mask, optional labels; layers: normalised indices;
        all_logits: a causal LM also gives every position's logits (a classifier always does)."""

    def _pick(self, hidden_states, layers) -> dict[int, torch.Tensor]:
        picked = {i: hidden_states[i] for i in layers}
        if self.final_norm_state == "pre" and self.num_layers in picked:
            picked[self.num_layers] = self._prenorm
        self._prenorm = None
        return picked


class SequenceClassifier(TaskModel):
    """Backbone + linear head on the masked mean of the last hidden state."""

    kind = "classifier"

    def __init__(self, backbone: nn.Module, num_labels: int, label_names: list[str] | None = None):
        super().__init__(backbone)
        if getattr(backbone, "pooler", None) is not None:
            # The head pools the last hidden state itself; an unused pooler would leave DDP
            # with parameters that get no gradient.
            backbone.pooler = None
        self.head = nn.Linear(self.hidden_size, num_labels)
        self.label_names = list(label_names or [str(i) for i in range(num_labels)])

    @property
    def num_outputs(self) -> int:
        return self.head.out_features

    def forward(self, inputs, layers=(), all_logits: bool = False) -> ModelOutputs:
        mask = inputs["attention_mask"]
        out = self._backbone_states(inputs["input_ids"], mask)
        last = out.hidden_states[-1]
        weights = mask.unsqueeze(-1).to(last.dtype)
        pooled = (last * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        logits = self.head(pooled)
        labels = inputs.get("labels")
        loss = F.cross_entropy(logits.float(), labels) if labels is not None else None
        return ModelOutputs(kd_logits=logits, hidden=self._pick(out.hidden_states, layers),
                            loss=loss, logits=logits)


class CausalLM(TaskModel):
    """A causal LM; the task loss is cross-entropy on response tokens only.

    Given labels, the LM head runs only on the rows that predict a response token (the
    backbone's own `logits_to_keep` with a boolean mask, so its logit transforms still apply):
    a headline is about 8 of some 150 tokens, and a full-vocabulary head on every position cost
    14-24% of a SmolLM2 student's step (benchmarks/speed.py measures it). `all_logits=True` (or
    `logits_on_response_rows = False`) also gives the (B, L, V) logits, for readers of every
    position (cross-tokenizer ULD)."""

    kind = "causal_lm"
    logits_on_response_rows = True

    def __init__(self, backbone: nn.Module):
        super().__init__(backbone)
        # A forward without a boolean `logits_to_keep` (older or custom models) logs once and
        # then computes every position's logits.
        self._keeps_rows = "logits_to_keep" in inspect.signature(backbone.forward).parameters

    @property
    def num_outputs(self) -> int:
        return int(self.backbone.get_output_embeddings().weight.shape[0])

    def forward(self, inputs, layers=(), all_logits: bool = False) -> ModelOutputs:
        labels = inputs.get("labels")
        positions = None if labels is None else response_positions(labels)
        rows_only = (positions is not None and not all_logits and self.logits_on_response_rows
                     and self._keeps_rows)
        kw = {"logits_to_keep": positions} if rows_only else {}
        out = self._backbone_states(inputs["input_ids"], inputs["attention_mask"], **kw)
        if rows_only and out.logits.dim() != 2:
            log.warning("%s ignores a boolean logits_to_keep; computing the logits of every "
                        "position", type(self.backbone).__name__)
            self._keeps_rows = False
            return self.forward(inputs, layers, all_logits)
        loss = kd_logits = kd_hidden = None
        if positions is not None:
            kd_logits = out.logits if rows_only else out.logits[positions]
            kd_hidden = out.hidden_states[-1][positions]
            targets = labels[:, 1:][positions[:, :-1]]
            # No response token in the batch: a zero that keeps every parameter in the graph.
            loss = (F.cross_entropy(kd_logits.float(), targets) if targets.numel()
                    else out.logits.sum() * 0)
        return ModelOutputs(kd_logits=kd_logits, hidden=self._pick(out.hidden_states, layers),
                            loss=loss, logits=None if rows_only else out.logits,
                            kd_hidden=kd_hidden, kd_head=self.backbone.get_output_embeddings().weight)

    def linear_head_problem(self) -> str | None:
        """Why the logits are not `last hidden state @ head weight.T` (None when they are).

        Soft-capping and logit scales are read from the config (a check on a random-init model's
        small logits would miss them); a forward on four tokens then catches the rest (a bias, a
        last hidden state taken before the final norm, a head that is not one matmul).
        """
        head = self.backbone.get_output_embeddings()
        if not isinstance(head, nn.Linear):
            return f"has an LM head of type {type(head).__name__}, not a Linear"
        if head.bias is not None:
            return "has an LM head with a bias"
        for key in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
            value = getattr(self.config, key, None)
            if value is not None and value != 1:
                return f"transforms its logits (config.{key}={value})"
        ids = torch.arange(1, 5, device=head.weight.device).clamp_max(head.weight.shape[0] - 1)[None]
        with torch.no_grad():
            out = self._backbone_states(ids, torch.ones_like(ids))
            logits = out.logits.float()
            direct = (out.hidden_states[-1] @ head.weight.T).float()
        half = head.weight.dtype in (torch.float16, torch.bfloat16)
        tol = (2e-2 if half else 1e-4) * logits.abs().max().clamp_min(1.0)
        if not torch.allclose(logits, direct, rtol=0, atol=float(tol)):
            return "gives logits that differ from its last hidden state times the head weight"
        return None


# ----------------------------------------------------------------------------- building

def load_tokenizer(spec: dict, resolve=lambda s: s):
    from transformers import AutoTokenizer

    source = spec.get("tokenizer") or spec.get("path") or (spec.get("prune") or {}).get("from")
    if not source:
        raise ConfigError(f"model {spec.get('name')!r}: set `tokenizer` (a path or hub name) "
                          "when the model is randomly initialised")
    tok = AutoTokenizer.from_pretrained(resolve(str(source)))
    if tok.pad_token is None:
        # Decoder tokenizers often ship without PAD; EOS is the usual stand-in.
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def final_norm(backbone: nn.Module) -> nn.Module | None:
    """The norm between a decoder's last block and its LM head (None: the backbone has none)."""
    base = getattr(backbone, "base_model", backbone)
    for name in FINAL_NORM_NAMES:
        module = getattr(base, name, None)
        if isinstance(module, nn.Module):
            return module
    return None


def apply_final_norm_state(model: TaskModel, spec: dict) -> TaskModel:
    """A spec's `final_norm_state` (post | pre, default post) on a built or loaded model."""
    return model.use_final_norm_state(spec.get("final_norm_state") or "post")


def transformer_blocks(backbone: nn.Module) -> nn.ModuleList:
    """The ModuleList of the backbone's transformer blocks (one per hidden layer)."""
    n = int(backbone.config.num_hidden_layers)
    for module in backbone.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise ConfigError(f"cannot find the {n} transformer blocks of {type(backbone).__name__}")


def keep_layers(backbone: nn.Module, keep: list[int]) -> nn.Module:
    """Prune a backbone to the listed blocks (in order): a same-width, shallower student."""
    blocks = transformer_blocks(backbone)
    n = len(blocks)
    bad = [i for i in keep if not 0 <= i < n]
    if bad or not keep or sorted(set(keep)) != list(keep):
        raise ConfigError(f"keep_layers={list(keep)} must be increasing block indices in 0..{n - 1}")
    kept = nn.ModuleList(blocks[i] for i in keep)
    for new_index, block in enumerate(kept):
        attn = getattr(block, "self_attn", None)
        if attn is not None and hasattr(attn, "layer_idx"):
            attn.layer_idx = new_index  # KV-cache slots follow the new numbering
    for name, module in backbone.named_modules():
        if module is blocks:
            parent = backbone.get_submodule(name.rsplit(".", 1)[0]) if "." in name else backbone
            setattr(parent, name.rsplit(".", 1)[-1], kept)
    config = backbone.config
    config.num_hidden_layers = len(keep)
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [config.layer_types[i] for i in keep]
    return backbone


def _backbone(spec: dict, head: str, tokenizer, resolve, seed: int, prune_inputs: dict) -> nn.Module:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    cls = AutoModelForCausalLM if head == "causal_lm" else AutoModel
    dtype = getattr(torch, spec.get("dtype") or "float32")
    name, kernel_name = spec.get("name"), spec.get("attn_implementation")
    kernel = kernel_kwargs(kernel_name)
    if spec.get("prune"):
        from flexkd.pruning import load_record, pruned_source

        folder, entry = pruned_source(spec["prune"], resolve, **prune_inputs)
        model = _load_with_attention(name, kernel_name,
                                     lambda: cls.from_pretrained(folder, dtype=dtype, **kernel))
        # for results.json: what was cut and how, where it is cached, whether it was reused
        model.flexkd_pruning = {**load_record(folder), "path": str(folder), "cache_hit": entry.cache_hit}
        return model
    if spec.get("path"):
        source = resolve(str(spec["path"]))
        model = _load_with_attention(name, kernel_name,
                                     lambda: cls.from_pretrained(source, dtype=dtype, **kernel))
        return keep_layers(model, list(spec["keep_layers"])) if spec.get("keep_layers") else model
    init = dict(spec.get("init") or {})
    if not init.get("model_type"):
        raise ConfigError(f"model {spec.get('name')!r}: give `path` or `init.model_type`")
    init.setdefault("vocab_size", len(tokenizer))
    init.setdefault("pad_token_id", tokenizer.pad_token_id)
    config = AutoConfig.for_model(init.pop("model_type"), **init)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = _load_with_attention(name, kernel_name, lambda: cls.from_config(config, **kernel))
    return model.to(dtype)


def kernel_kwargs(attn_implementation: str | None) -> dict:
    """from_pretrained's kwargs for an attention kernel; none (transformers' default, mostly
    sdpa) when it is not set."""
    return {"attn_implementation": attn_implementation} if attn_implementation else {}


def _load_with_attention(name, kernel: str | None, load: Callable[[], nn.Module]) -> nn.Module:
    """`load()`, with transformers' refusal of `kernel` (the model's `attn_implementation`, a
    kernel this architecture or machine lacks) turned into an error that names the key."""
    try:
        return load()
    except (ValueError, ImportError) as e:
        if not kernel or "atten" not in str(e).lower():
            raise
        raise ConfigError(f"model {name!r}: attn_implementation={kernel!r} is not "
                          f"available: {str(e).splitlines()[0]} Set it to eager or sdpa, or drop "
                          "it (transformers' default).") from e


def uses_label_words(pair) -> bool:
    """Causal pairs may solve classification by writing label words (`pair.classify_with`)."""
    return pair.get("classify_with", "head") == "label_words"


def build_model(spec: dict, task_format: str, tokenizer, label_names=None,
                resolve=lambda s: s, seed: int = 0, label_words: bool = False,
                cache_dir=None, calibration=None, prune_scores=None) -> TaskModel:
    """A TaskModel for `task_format` ('classification' or 'instruction') from a config spec.

    With `label_words`, a classification task is solved by a causal LM that writes the label's
    name after the text (scored as multiple choice), instead of by a linear head.
    A spec with `prune: {from: ..., hidden_size: ...}` is a student pruned from a pretrained
    model (flexkd.pruning), cached under `cache_dir`; `calibration` (batches of input_ids,
    attention_mask) and `prune_scores` feed its ranking."""
    prune_inputs = {"cache_root": cache_dir, "calibration_batches": calibration, "scores": prune_scores}
    if task_format == "classification" and not label_words:
        backbone = _backbone(spec, "encoder", tokenizer, resolve, seed, prune_inputs)
        with torch.random.fork_rng():
            torch.manual_seed(seed + 1)
            model = SequenceClassifier(backbone, len(label_names), label_names)
        return apply_final_norm_state(model.to(backbone.dtype), spec)
    if task_format == "instruction" or label_words:
        backbone = _backbone(spec, "causal_lm", tokenizer, resolve, seed, prune_inputs)
        if not hasattr(backbone, "get_output_embeddings") or backbone.get_output_embeddings() is None:
            raise ConfigError(f"model {spec.get('name')!r} has no LM head; instruction tasks need "
                              "a causal LM (choose a decoder pair, e.g. pair=tiny_causal)")
        return apply_final_norm_state(CausalLM(backbone), spec)
    raise ConfigError(f"unknown task format {task_format!r}; use classification or instruction")


def trainable_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def total_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------- saving

def save_model(model: TaskModel, tokenizer, directory: str | Path) -> Path:
    """Write a model as a normal HF directory (+ head for classifiers), atomically."""
    from flexkd.storage import atomic_directory

    def fill(tmp: Path) -> None:
        model.backbone.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        meta: dict[str, Any] = {"kind": model.kind}
        if isinstance(model, SequenceClassifier):
            torch.save(model.head.state_dict(), tmp / HEAD_WEIGHTS)
            meta.update(num_labels=model.num_outputs, label_names=model.label_names)
        (tmp / CLASSIFIER_FILE).write_text(json.dumps(meta, indent=2))

    return atomic_directory(directory, fill)


def load_saved_model(directory: str | Path, attn_implementation: str | None = None) -> tuple[TaskModel, Any]:
    """Inverse of save_model: (model, tokenizer). `attn_implementation`: the attention kernel
    (None: transformers' default; a saved config does not keep it)."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    kernel = kernel_kwargs(attn_implementation)
    directory = Path(directory)
    meta_path = directory / CLASSIFIER_FILE
    if not meta_path.exists():
        raise FileNotFoundError(f"{directory} is not a flexkd model directory ({CLASSIFIER_FILE} missing)")
    meta = json.loads(meta_path.read_text())
    tok = AutoTokenizer.from_pretrained(directory)
    cls = AutoModel if meta["kind"] == "classifier" else AutoModelForCausalLM
    backbone = _load_with_attention(str(directory), attn_implementation,
                                    lambda: cls.from_pretrained(directory, **kernel))
    if meta["kind"] == "classifier":
        model = SequenceClassifier(backbone, meta["num_labels"], meta.get("label_names"))
        model.head.load_state_dict(torch.load(directory / HEAD_WEIGHTS, weights_only=True))
    else:
        model = CausalLM(backbone)
    return model, tok
