"""Structural pruning of Hugging Face models: pretrained students of any width and depth.

Cut a pretrained model (typically the teacher) to a student's shape, as Minitron and
Sheared-LLaMA do, so the student keeps the teacher's tokenizer and most of its knowledge:

* width: one subset of the residual-stream dims, the same everywhere the stream is read or
  written (token/position/token-type embeddings, q/k/v input columns, attention-output and
  MLP-down output rows, every LayerNorm/RMSNorm, the final norm, the LM or classifier head;
  tied embeddings stay tied);
* attention heads, respecting grouped KV heads (see `choose_heads`); for BERT/MPNet, whose
  head size is hidden_size / num_heads, also the dims inside each kept head (q.k dims and v/o
  dims chosen separately; q is rescaled so the softmax keeps the source's 1/sqrt(head size)).
  MPNet shares one relative-attention bias across layers, so it keeps one head subset for all;
* MLP channels (intermediate_size);
* depth: a list of blocks to keep (`flexkd.models.keep_layers`).

Supported: Llama-family decoders (LlamaForCausalLM, LlamaModel) and BERT/MPNet encoders
(BertModel, MPNetModel), bare or inside a flexkd TaskModel (a classifier head's input columns
are pruned with the stream).

Rankings (`PrunePlan.rank_by`):
* ``activation`` (Minitron): a residual dim scores the mean |output| of every norm over the
  stream on calibration tokens; a head, the mean L2 norm of its contribution to the stream
  (its attention output through its slice of the output projection); an MLP channel, the mean
  |activation| times the norm of its down-projection column (again its contribution's norm,
  so a channel or head that writes nothing scores 0).
* ``random``: seeded.
* ``scores``: residual dims by scores given from outside (the Flex-KD probe's per-dim
  importance, length d); heads, head dims and channels, when pruned too, by activation.
* ``probe`` (a model spec's default): ``scores`` from the Flex-KD importance probe of the
  (fine-tuned) teacher on the task (`flexkd.pipeline.pruning_scores`; the source must be the
  teacher's model). The residual stream is one space shared by every block (each block reads
  and adds to it), so the probe's per-dim scores at one layer (the last, by default) rank the
  stream's dims everywhere.
The top-scoring units are kept in their original index order (so dim i of the student is
the teacher's i-th kept dim, and head/group order is preserved); the kept indices are recorded.

Pruning changes the function even for the kept units: a LayerNorm/RMSNorm over a subset of
dims normalises by that subset's mean/variance, and every removed unit's contribution to the
stream is gone. That is inherent to width pruning; a short distillation recovers it. With
every unit kept, the pruned model is the original (exactly: same weights, same order).
Depth pruning happens first, so activation ranks reflect the blocks actually kept.

    model = build_pruned("path/to/teacher", PrunePlan(hidden_size=288, rank_by="activation"),
                         calibration_batches)          # a pruned copy; record on .flexkd_pruning
    save_pruned(model, tokenizer, "out/", model.flexkd_pruning)   # AutoModel*.from_pretrained("out/")
    folder, entry = cached_pruned("path/to/teacher", plan, cache_root, calibration_batches)

A model spec `prune: {from: <path|asset:name|hub name>, hidden_size: ..., num_layers: ...}`
is built through `pruned_source` (flexkd.models.build_model).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flexkd.errors import ConfigError
from flexkd.models import TaskModel, keep_layers, total_parameters

log = logging.getLogger(__name__)

RANKINGS = ("activation", "random", "scores", "probe")
EXTERNAL_RANKINGS = ("scores", "probe")  # residual dims ranked by scores passed in
SPEC_RANKING = "probe"  # a model spec's default: the Flex-KD probe of the (fine-tuned) teacher
RECORD_FILE = "flexkd_pruning.json"
CACHE_VERSION = 1
# Mistral's decoder is Llama's (see `_saveable`), so a student written as Mistral prunes the same.
FAMILIES = {"LlamaForCausalLM": "llama", "LlamaModel": "llama", "MistralForCausalLM": "llama",
            "MistralModel": "llama", "BertModel": "bert", "MPNetModel": "mpnet"}


@dataclass(frozen=True)
class PrunePlan:
    """The student's shape; None keeps that dimension of the source as it is.

    num_heads: query heads per layer; num_kv_heads: KV heads (Llama; default in `choose_heads`).
    keep_layers: source block indices to keep, increasing.
    probe_layer / probe_score: for rank_by="probe", the teacher layer and importance score
    (flexkd.importance) the caller probed with; recorded (and keyed) with the plan.
    """

    hidden_size: int | None = None
    num_heads: int | None = None
    num_kv_heads: int | None = None
    intermediate_size: int | None = None
    keep_layers: tuple[int, ...] | None = None
    rank_by: str = "activation"
    seed: int = 0
    probe_layer: int = -1
    probe_score: str = "grad"

    def __post_init__(self):
        if self.rank_by not in RANKINGS:
            raise ConfigError(f"prune.rank_by={self.rank_by!r} is not valid; choose one of {RANKINGS}")
        for name in ("hidden_size", "num_heads", "num_kv_heads", "intermediate_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"prune.{name} must be a positive integer, got {value!r}")
        if self.keep_layers is not None:
            object.__setattr__(self, "keep_layers", tuple(int(i) for i in self.keep_layers))

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> PrunePlan:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(spec) - known)
        if unknown:
            raise ConfigError(f"unknown prune key(s) {unknown}; valid: {sorted(known)}")
        return cls(**dict(spec))

    def as_dict(self) -> dict[str, Any]:
        plan = asdict(self)
        plan["keep_layers"] = list(self.keep_layers) if self.keep_layers is not None else None
        return plan


# ----------------------------------------------------------------------------- layout

@dataclass
class _Attention:
    module: nn.Module
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear


@dataclass
class _Block:
    attention: _Attention
    mlp_in: list[nn.Linear]  # up (and gate): rows are channels, columns the stream
    mlp_out: nn.Linear       # down: columns are channels, rows the stream
    mlp: nn.Module


@dataclass
class _Layout:
    """Where one architecture keeps each piece the pruner touches."""

    family: str
    config: Any
    base: nn.Module                        # runs the calibration forward
    embeddings: list[nn.Embedding]
    norms: list[nn.Module]                 # every norm over the stream
    blocks: list[_Block]
    readers: list[nn.Linear]               # read the stream: LM head, classifier head
    squares: list[nn.Linear] = field(default_factory=list)   # stream -> stream (BERT pooler)
    tied: list[tuple[nn.Linear, nn.Embedding]] = field(default_factory=list)
    head_bias: nn.Embedding | None = None  # MPNet's relative-attention bias, shared by all layers

    @property
    def num_heads(self) -> int:
        return int(self.config.num_attention_heads)

    @property
    def num_kv_heads(self) -> int:
        return int(getattr(self.config, "num_key_value_heads", None) or self.num_heads)

    @property
    def head_dim(self) -> int:
        return int(getattr(self.config, "head_dim", None) or self.config.hidden_size // self.num_heads)


def _family(model: nn.Module) -> str:
    family = FAMILIES.get(type(model).__name__)
    if family is None:
        raise ConfigError(f"cannot prune a {type(model).__name__}; supported: {sorted(FAMILIES)} "
                          "(bare or inside a flexkd TaskModel)")
    return family


def _layout(model: nn.Module) -> _Layout:
    """The pieces of `model` (an HF model or a flexkd TaskModel) the pruner edits."""
    extra_readers: list[nn.Linear] = []
    if isinstance(model, TaskModel):
        head = getattr(model, "head", None)
        if isinstance(head, nn.Linear):
            extra_readers.append(head)
        model = model.backbone
    family = _family(model)
    if family == "llama":
        base = model.model if hasattr(model, "lm_head") else model
        blocks = [_Block(_Attention(b.self_attn, b.self_attn.q_proj, b.self_attn.k_proj,
                                    b.self_attn.v_proj, b.self_attn.o_proj),
                         [b.mlp.gate_proj, b.mlp.up_proj], b.mlp.down_proj, b.mlp)
                  for b in base.layers]
        norms = [n for b in base.layers for n in (b.input_layernorm, b.post_attention_layernorm)]
        layout = _Layout(family, model.config, base, [base.embed_tokens], norms + [base.norm],
                         blocks, [])
        head = getattr(model, "lm_head", None)
        if head is not None:
            if head.weight is base.embed_tokens.weight:
                layout.tied.append((head, base.embed_tokens))
            else:
                layout.readers.append(head)
    else:
        emb = model.embeddings
        embeddings = [emb.word_embeddings, emb.position_embeddings]
        if getattr(emb, "token_type_embeddings", None) is not None:
            embeddings.append(emb.token_type_embeddings)
        norms, blocks = [emb.LayerNorm], []
        for b in model.encoder.layer:
            if family == "bert":
                s = b.attention.self
                attn = _Attention(s, s.query, s.key, s.value, b.attention.output.dense)
                norms.append(b.attention.output.LayerNorm)
            else:
                s = b.attention.attn
                attn = _Attention(s, s.q, s.k, s.v, s.o)
                norms.append(b.attention.LayerNorm)
            norms.append(b.output.LayerNorm)
            blocks.append(_Block(attn, [b.intermediate.dense], b.output.dense, b.intermediate))
        pooler = getattr(model, "pooler", None)
        layout = _Layout(family, model.config, model, embeddings, norms, blocks, [],
                         squares=[pooler.dense] if pooler is not None else [],
                         head_bias=getattr(model.encoder, "relative_attention_bias", None))
    layout.readers.extend(extra_readers)
    return layout


# ----------------------------------------------------------------------------- ranking

def top_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores (ties: lower index first), in increasing index order."""
    order = torch.sort(scores.float(), descending=True, stable=True).indices[:k]
    return order.sort().values


def kv_heads_for(num_heads: int, num_kv_heads: int, heads: int, kv: int | None) -> int:
    """How many KV heads a plan keeps. Default: every KV head, each keeping heads/num_kv query
    heads (pruning inside groups) when that divides; else whole groups of query heads."""
    group = num_heads // num_kv_heads
    if kv is None:
        if heads % num_kv_heads == 0:
            return num_kv_heads
        if heads % group == 0:
            return heads // group
        raise ConfigError(f"prune.num_heads={heads} fits neither {num_kv_heads} KV groups nor whole "
                          f"groups of {group} query heads; choose a multiple of {num_kv_heads} or {group}")
    if kv > num_kv_heads or heads % kv or heads // kv > group:
        raise ConfigError(f"prune.num_kv_heads={kv} cannot serve num_heads={heads}: it must be <= "
                          f"{num_kv_heads}, divide num_heads, and leave <= {group} query heads per group")
    return kv


def choose_heads(scores: torch.Tensor, num_kv_heads: int, heads: int, kv: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept query heads, kept KV heads), both increasing.

    Query head h belongs to KV group h // G (G = H / num_kv_heads, HF's repeat_kv layout). Each
    kept group keeps its best heads/kv query heads; groups rank by the sum of those. So every
    kept group has the same number of query heads and num_heads % num_kv_heads == 0 holds.
    """
    per = heads // kv
    grouped = scores.float().view(num_kv_heads, -1)
    best = torch.sort(grouped, dim=1, descending=True, stable=True).indices[:, :per]
    groups = top_sorted(grouped.gather(1, best).sum(1), kv)
    group_size = grouped.shape[1]
    q_heads = torch.cat([g * group_size + best[g].sort().values for g in groups.tolist()])
    return q_heads, groups


@dataclass
class _Stats:
    """Activation statistics summed over calibration tokens (float64)."""

    resid: torch.Tensor
    heads: list[torch.Tensor]
    q: list[torch.Tensor]
    k: list[torch.Tensor]
    z: list[torch.Tensor]          # |input of the attention output projection|, per column
    channels: list[torch.Tensor]
    tokens: int = 0


def _calibration_inputs(batch: Mapping[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    if "input_ids" not in batch:
        raise ConfigError("calibration batches must be dicts with input_ids (and attention_mask)")
    ids = batch["input_ids"].to(device)
    mask = batch.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask.to(device)
    return {"input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def activation_stats(layout: _Layout, batches: Iterable[Mapping[str, torch.Tensor]],
                     want: Iterable[str] = ("hidden", "heads", "head_dims", "intermediate")) -> _Stats:
    """One pass over `batches` with forward hooks for the statistics in `want` (the others
    stay zero): hidden (norm outputs), heads (and the o-projection inputs), head_dims (q and
    k outputs), intermediate (MLP down-projection inputs)."""
    want = set(want)
    n = len(layout.blocks)
    d = int(layout.config.hidden_size)
    hd = layout.head_dim

    def zeros(size):
        return [torch.zeros(size, dtype=torch.float64) for _ in range(n)]

    stats = _Stats(torch.zeros(d, dtype=torch.float64), zeros(layout.num_heads),
                   zeros(layout.num_heads * hd), zeros(layout.num_kv_heads * hd),
                   zeros(layout.num_heads * hd), zeros(int(layout.config.intermediate_size)))
    mask_now: list[torch.Tensor] = []

    def masked_abs_sum(x: torch.Tensor) -> torch.Tensor:
        m = mask_now[0].to(x.dtype).unsqueeze(-1)
        return (x.abs() * m).sum((0, 1)).double().cpu()

    def add(target: list | torch.Tensor, i: int | None = None):
        def hook(module, args, out=None):
            x = (out if out is not None else args[0]).float()
            if i is None:
                target.add_(masked_abs_sum(x))
            else:
                target[i] += masked_abs_sum(x)
        return hook

    def head_hook(i: int, o: nn.Linear):
        def hook(module, args):
            z = args[0].float()
            b, length, _ = z.shape
            w = o.weight.float().view(d, layout.num_heads, hd)
            # Each head's contribution to the stream: its slice of z through its o columns.
            contrib = torch.einsum("blhe,dhe->blhd", z.view(b, length, layout.num_heads, hd), w)
            m = mask_now[0].float().unsqueeze(-1)
            stats.heads[i] += (contrib.norm(dim=-1) * m).sum((0, 1)).double().cpu()
            stats.z[i] += masked_abs_sum(z)
        return hook

    handles = [norm.register_forward_hook(add(stats.resid)) for norm in layout.norms] \
        if "hidden" in want else []
    for i, block in enumerate(layout.blocks):
        a = block.attention
        if want & {"heads", "head_dims"}:
            handles.append(a.o.register_forward_pre_hook(head_hook(i, a.o)))
        if "head_dims" in want:
            handles += [a.q.register_forward_hook(add(stats.q, i)),
                        a.k.register_forward_hook(add(stats.k, i))]
        if "intermediate" in want:
            handles.append(block.mlp_out.register_forward_pre_hook(add(stats.channels, i)))
    was_training = layout.base.training
    layout.base.eval()
    device = next(layout.base.parameters()).device
    try:
        for batch in batches:
            inputs = _calibration_inputs(batch, device)
            mask_now[:] = [inputs["attention_mask"]]
            layout.base(**inputs)
            stats.tokens += int(inputs["attention_mask"].sum())
    finally:
        for h in handles:
            h.remove()
        layout.base.train(was_training)
    if stats.tokens == 0:
        raise ConfigError("calibration batches held no tokens; activation ranking needs some")
    return stats


# ----------------------------------------------------------------------------- editing

def _param(like: nn.Parameter, data: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(data.contiguous().clone(), requires_grad=like.requires_grad)


def _slice_linear(lin: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None,
                  row_scale: float = 1.0) -> None:
    w = lin.weight.data
    if rows is not None:
        w = w.index_select(0, rows.to(w.device))
    if cols is not None:
        w = w.index_select(1, cols.to(w.device))
    if row_scale != 1.0:
        w = w * row_scale
    lin.weight = _param(lin.weight, w)
    if lin.bias is not None and rows is not None:
        b = lin.bias.data.index_select(0, rows.to(w.device))
        lin.bias = _param(lin.bias, b * row_scale if row_scale != 1.0 else b)
    lin.out_features, lin.in_features = lin.weight.shape


def _slice_norm(norm: nn.Module, dims: torch.Tensor) -> None:
    norm.weight = _param(norm.weight, norm.weight.data.index_select(0, dims.to(norm.weight.device)))
    if getattr(norm, "bias", None) is not None:
        norm.bias = _param(norm.bias, norm.bias.data.index_select(0, dims.to(norm.bias.device)))
    if hasattr(norm, "normalized_shape"):
        norm.normalized_shape = (len(dims),)


def _slice_embedding(emb: nn.Embedding, dims: torch.Tensor) -> None:
    emb.weight = _param(emb.weight, emb.weight.data.index_select(1, dims.to(emb.weight.device)))
    emb.embedding_dim = len(dims)


def _prune_stream(layout: _Layout, dims: torch.Tensor) -> None:
    for emb in layout.embeddings:
        _slice_embedding(emb, dims)
    for norm in layout.norms:
        _slice_norm(norm, dims)
    for block in layout.blocks:
        a = block.attention
        for lin in (a.q, a.k, a.v, *block.mlp_in):
            _slice_linear(lin, cols=dims)
        for lin in (a.o, block.mlp_out):
            _slice_linear(lin, rows=dims)
    for lin in layout.squares:
        _slice_linear(lin, rows=dims, cols=dims)
    for lin in layout.readers:
        _slice_linear(lin, cols=dims)
    for head, emb in layout.tied:
        head.weight = emb.weight
        head.in_features = emb.embedding_dim


def _span(heads: torch.Tensor, dims: list[torch.Tensor] | None, hd: int) -> torch.Tensor:
    """Flat projection indices of `heads` (dims[j]: kept dims inside the j-th listed head)."""
    parts = [h * hd + (dims[j] if dims is not None else torch.arange(hd))
             for j, h in enumerate(heads.tolist())]
    return torch.cat(parts)


def _prune_attention(block: _Block, layout: _Layout, q_heads: torch.Tensor, kv_heads: torch.Tensor,
                     qk_dims: list[torch.Tensor] | None, vo_dims: list[torch.Tensor] | None) -> None:
    a, hd = block.attention, layout.head_dim
    q_rows = _span(q_heads, qk_dims, hd)
    # Llama: K/V rows are whole KV heads; BERT/MPNet: KV head = query head, own dims.
    kv_rows = _span(kv_heads, qk_dims if layout.family != "llama" else None, hd)
    v_rows = kv_rows if layout.family == "llama" else _span(kv_heads, vo_dims, hd)
    o_cols = _span(q_heads, vo_dims, hd)
    new_hd = len(q_rows) // len(q_heads)
    # Fewer q.k dims: keep the softmax temperature of the source (scores scaled by 1/sqrt(hd)).
    scale = math.sqrt(new_hd / hd)
    _slice_linear(a.q, rows=q_rows, row_scale=scale)
    _slice_linear(a.k, rows=kv_rows)
    _slice_linear(a.v, rows=v_rows)
    _slice_linear(a.o, cols=o_cols)
    m, heads = a.module, len(q_heads)
    if layout.family == "llama":
        m.num_key_value_groups = heads // len(kv_heads)
    else:
        m.num_attention_heads, m.attention_head_size, m.all_head_size = heads, new_hd, heads * new_hd
        if hasattr(m, "scaling"):
            m.scaling = new_hd ** -0.5


def _prune_mlp(block: _Block, channels: torch.Tensor) -> None:
    for lin in block.mlp_in:
        _slice_linear(lin, rows=channels)
    _slice_linear(block.mlp_out, cols=channels)
    if hasattr(block.mlp, "intermediate_size"):
        block.mlp.intermediate_size = len(channels)


# ----------------------------------------------------------------------------- prune

def _needs(plan: PrunePlan, layout: _Layout) -> dict[str, bool]:
    """Which structures this plan cuts, and the student's sizes."""
    c = layout.config
    d = int(c.hidden_size)
    heads = plan.num_heads or layout.num_heads
    new_d = plan.hidden_size or d
    if new_d > d:
        raise ConfigError(f"prune.hidden_size={new_d} exceeds the source's hidden size {d}")
    if heads > layout.num_heads:
        raise ConfigError(f"prune.num_heads={heads} exceeds the source's {layout.num_heads} heads")
    if plan.intermediate_size and plan.intermediate_size > int(c.intermediate_size):
        raise ConfigError(f"prune.intermediate_size={plan.intermediate_size} exceeds the source's "
                          f"{c.intermediate_size}")
    if layout.family == "llama":
        new_hd = layout.head_dim
    else:
        # BERT/MPNet fix head size = hidden_size / num_heads, so the heads must tile the stream.
        if new_d % heads:
            raise ConfigError(f"{layout.family}: prune.hidden_size={new_d} must be a multiple of "
                              f"num_heads={heads} (head size = hidden_size / num_heads)")
        new_hd = new_d // heads
        if new_hd > layout.head_dim:
            raise ConfigError(f"{layout.family}: hidden_size={new_d} with {heads} heads needs head size "
                              f"{new_hd} > the source's {layout.head_dim}; prune hidden_size too, "
                              "or fewer heads")
    kv = kv_heads_for(layout.num_heads, layout.num_kv_heads, heads, plan.num_kv_heads) \
        if layout.family == "llama" else heads
    # A size the plan gives is applied even when it is the full size (the slices are then
    # identities), so "keep everything" runs the same code as a real cut.
    return {"hidden": plan.hidden_size is not None,
            "heads": plan.num_heads is not None or plan.num_kv_heads is not None,
            "head_dims": new_hd < layout.head_dim,
            "channels": plan.intermediate_size is not None,
            "new_d": new_d, "heads_n": heads, "kv_n": kv, "new_hd": new_hd}


def prune(model: nn.Module, plan: PrunePlan, calibration_batches: Iterable[Mapping] | None = None,
          scores: torch.Tensor | None = None) -> dict[str, Any]:
    """Prune `model` in place to `plan`; returns the record (plan, kept indices, parameters).

    calibration_batches: dicts with input_ids (and attention_mask), for activation rankings.
    scores: (d,) residual-dim importance, for rank_by="scores".
    """
    before = total_parameters(model)
    backbone = model.backbone if isinstance(model, TaskModel) else model
    _family(backbone)
    source_layers = int(backbone.config.num_hidden_layers)
    if plan.keep_layers is not None:
        keep_layers(backbone, list(plan.keep_layers))
    layout = _layout(model)
    need = _needs(plan, layout)
    d, n = int(layout.config.hidden_size), len(layout.blocks)
    if plan.rank_by in EXTERNAL_RANKINGS:
        if scores is None:
            raise ConfigError(f"prune.rank_by={plan.rank_by} needs the per-dim scores (e.g. the "
                              "Flex-KD probe's)")
        scores = torch.as_tensor(scores).flatten()
        if scores.numel() != d:
            raise ConfigError(f"prune scores have {scores.numel()} entries; the source's hidden size is {d}")
    needs_stats = (plan.rank_by == "activation" and need["hidden"]) or (
        plan.rank_by != "random" and (need["heads"] or need["head_dims"] or need["channels"]))
    stats = None
    if needs_stats:
        if calibration_batches is None:
            raise ConfigError(f"prune.rank_by={plan.rank_by} ranks by activations here: pass calibration "
                              "batches (dicts with input_ids, attention_mask)")
        want = [name for name, cut in (("hidden", need["hidden"] and plan.rank_by == "activation"),
                                       ("heads", need["heads"]), ("head_dims", need["head_dims"]),
                                       ("intermediate", need["channels"])) if cut]
        stats = activation_stats(layout, calibration_batches, want)
    gen = torch.Generator().manual_seed(plan.seed)

    def rank(activation: torch.Tensor, size: int) -> torch.Tensor:
        return torch.rand(size, generator=gen, dtype=torch.float64) if plan.rank_by == "random" \
            else activation

    kept: dict[str, Any] = {"layers": list(plan.keep_layers or range(source_layers))}
    ranked: dict[str, str] = {}
    if need["hidden"]:
        resid = scores if plan.rank_by in EXTERNAL_RANKINGS else rank(stats.resid if stats else None, d)
        ranked["hidden"] = plan.rank_by
        kept["hidden"] = top_sorted(resid, need["new_d"])
    else:
        kept["hidden"] = torch.arange(d)
    other = "random" if plan.rank_by == "random" else "activation"

    heads_n, kv_n, hd, new_hd = need["heads_n"], need["kv_n"], layout.head_dim, need["new_hd"]
    if need["heads"] or need["head_dims"]:
        ranked["heads"] = other
        if layout.head_bias is not None:
            # MPNet: one relative-attention bias for all layers -> one head subset for all layers.
            total = sum(rank(stats.heads[i] if stats else None, layout.num_heads) for i in range(n))
            shared = choose_heads(total, layout.num_kv_heads, heads_n, kv_n)
            choices = [shared] * n
        else:
            choices = [choose_heads(rank(stats.heads[i] if stats else None, layout.num_heads),
                                    layout.num_kv_heads, heads_n, kv_n) for i in range(n)]
        kept["heads"] = [c[0].tolist() for c in choices]
        kept["kv_heads"] = [c[1].tolist() for c in choices]
        qk_all, vo_all = [], []
        for i, (q_heads, kv_heads) in enumerate(choices):
            qk_dims = vo_dims = None
            if need["head_dims"]:
                ranked["head_dims"] = other
                q_act = z_act = None
                if stats is not None:
                    q_act = (stats.q[i] * stats.k[i]).view(-1, hd)
                    col_norms = layout.blocks[i].attention.o.weight.float().norm(dim=0).double()
                    z_act = (stats.z[i] * col_norms).view(-1, hd)
                qk_dims = [top_sorted(rank(q_act[h] if q_act is not None else None, hd), new_hd)
                           for h in q_heads.tolist()]
                vo_dims = [top_sorted(rank(z_act[h] if z_act is not None else None, hd), new_hd)
                           for h in q_heads.tolist()]
                qk_all.append([x.tolist() for x in qk_dims])
                vo_all.append([x.tolist() for x in vo_dims])
            _prune_attention(layout.blocks[i], layout, q_heads, kv_heads, qk_dims, vo_dims)
        if qk_all:
            kept["qk_dims"], kept["vo_dims"] = qk_all, vo_all
        if layout.head_bias is not None:
            bias = layout.head_bias
            bias.weight = _param(bias.weight, bias.weight.data.index_select(1, choices[0][0]))
            bias.embedding_dim = heads_n
            layout.base.encoder.n_heads = heads_n
    if need["channels"]:
        ranked["intermediate"] = other
        kept["intermediate"] = []
        for i, block in enumerate(layout.blocks):
            act = None
            if stats is not None:
                act = stats.channels[i] * block.mlp_out.weight.float().norm(dim=0).double()
            channels = top_sorted(rank(act, int(layout.config.intermediate_size)), plan.intermediate_size)
            _prune_mlp(block, channels)
            kept["intermediate"].append(channels.tolist())
    if need["hidden"]:
        _prune_stream(layout, kept["hidden"])
    kept["hidden"] = kept["hidden"].tolist()

    c = layout.config
    c.hidden_size = need["new_d"]
    c.num_attention_heads = heads_n
    if layout.family == "llama":
        c.num_key_value_heads = kv_n
        c.head_dim = hd  # explicit: hidden_size / num_heads no longer gives it
    if need["channels"]:
        c.intermediate_size = plan.intermediate_size
    after = total_parameters(model)
    record = {"plan": plan.as_dict(), "family": layout.family, "ranked": ranked, "kept": kept,
              "parameters": {"before": before, "after": after},
              "shape": {"hidden_size": c.hidden_size, "num_hidden_layers": int(c.num_hidden_layers),
                        "num_attention_heads": heads_n, "num_key_value_heads": kv_n,
                        "head_dim": new_hd, "intermediate_size": int(c.intermediate_size)}}
    if stats is not None:
        record["calibration_tokens"] = stats.tokens
    log.info("pruned %s: %d -> %d parameters (%s)", layout.family, before, after, record["shape"])
    return record


# ----------------------------------------------------------------------------- build / save

def _load_source(source: str | Path, dtype: torch.dtype | None = None) -> nn.Module:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(source))
    causal = any(a.endswith("ForCausalLM") for a in (config.architectures or []))
    cls = AutoModelForCausalLM if causal else AutoModel
    return cls.from_pretrained(str(source), dtype=dtype or torch.float32)


def build_pruned(source: str | Path | nn.Module, plan: PrunePlan,
                 calibration_batches: Iterable[Mapping] | None = None,
                 scores: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> nn.Module:
    """A pruned copy of `source` (an HF directory / hub name, or a model, left untouched).

    A directory whose config lists a *ForCausalLM architecture loads as a causal LM, others
    with AutoModel. The record (`prune`'s return value) is on `model.flexkd_pruning`.
    """
    if isinstance(source, nn.Module):
        model, name = copy.deepcopy(source), type(source).__name__
    else:
        model, name = _load_source(source, dtype), str(source)
    record = prune(model, plan, calibration_batches, scores)
    record["source"] = name
    model.flexkd_pruning = record
    return model


def _saveable(model: nn.Module) -> nn.Module:
    """`model`, or the same decoder as a Mistral model where transformers cannot write it as
    Llama: its LlamaConfig refuses a hidden size that is not a multiple of the head count even
    when head_dim is given (SmolLM2's 9 heads at d 384 or 192). Mistral's decoder is Llama's
    (RMSNorm, SwiGLU, RoPE, grouped KV, no biases) with head_dim free, so the weights carry over
    by name and the outputs are the same (tests/test_pruning.py); sliding_window=None keeps
    attention full."""
    c = model.config
    if getattr(c, "model_type", None) != "llama" or c.hidden_size % c.num_attention_heads == 0:
        return model
    from transformers import MistralConfig, MistralForCausalLM, MistralModel

    if getattr(c, "attention_bias", False) or getattr(c, "mlp_bias", False):
        raise ConfigError(f"prune.hidden_size={c.hidden_size} is not a multiple of the "
                          f"{c.num_attention_heads} kept heads, which transformers' Llama config "
                          "refuses, and this Llama has biases that Mistral (the fallback) lacks; "
                          "choose a hidden_size that the head count divides")
    settings = {k: v for k, v in c.to_dict().items()
                if k not in ("model_type", "architectures", "attention_bias", "mlp_bias",
                             "pretraining_tp", "transformers_version")}
    causal = hasattr(model, "lm_head")
    mistral_config = MistralConfig(**{**settings, "sliding_window": None},
                                   architectures=["MistralForCausalLM" if causal else "MistralModel"])
    mistral = (MistralForCausalLM if causal else MistralModel)(mistral_config)
    mistral.load_state_dict(model.state_dict())
    log.info("d %d is not a multiple of %d heads, which transformers' LlamaConfig refuses: "
             "writing the pruned decoder as the equivalent %s", c.hidden_size,
             c.num_attention_heads, type(mistral).__name__)
    return mistral.to(next(model.parameters()).dtype).eval()


def _write_pruned(model: nn.Module, tokenizer, out: Path, record: dict) -> None:
    if isinstance(model, TaskModel):
        raise ConfigError("save_pruned writes HF models; save a pruned TaskModel with "
                          "flexkd.models.save_model")
    model = _saveable(model)
    model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    (out / RECORD_FILE).write_text(json.dumps(record, indent=1) + "\n")


def save_pruned(model: nn.Module, tokenizer, out_dir: str | Path, record: dict) -> Path:
    """Write a pruned HF model as a normal HF directory + RECORD_FILE, atomically."""
    from flexkd.storage import atomic_directory

    return atomic_directory(out_dir, lambda tmp: _write_pruned(model, tokenizer, tmp, record))


def load_record(directory: str | Path) -> dict:
    return json.loads((Path(directory) / RECORD_FILE).read_text())


# ----------------------------------------------------------------------------- cache

def source_fingerprint(source: str | Path) -> Any:
    """What identifies a source model: a flexkd cache entry's key (assets, fine-tuned
    teachers), else the sha256 of a local folder's config and weight files, else its name."""
    from flexkd.cache import read_manifest
    from flexkd.storage import file_sha256

    folder = Path(source)
    if not folder.is_dir():
        return str(source)
    manifest = read_manifest(folder)
    if manifest and manifest.get("key"):
        return {"entry": manifest["key"]}
    files = sorted(f for f in folder.iterdir()
                   if f.name == "config.json" or f.suffix in (".safetensors", ".bin"))
    return {f.name: file_sha256(f) for f in files}


def tensors_fingerprint(tensors: Iterable[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def cached_pruned(source: str | Path, plan: PrunePlan, cache_root: str | Path,
                  calibration_batches: Iterable[Mapping] | None = None,
                  scores: torch.Tensor | None = None, dtype: torch.dtype | None = None):
    """The cache entry (a reloadable HF folder + RECORD_FILE) of `source` pruned to `plan`.

    Keyed by the source's fingerprint, the plan, and what the ranking reads (the scores; the
    calibration tokens unless the ranking is random). Returns (folder, flexkd.cache.EntryInfo).
    """
    from flexkd.cache import get_or_build

    batches = list(calibration_batches) if calibration_batches is not None else None
    key = {"source": source_fingerprint(source), "plan": plan.as_dict(),
           "dtype": str(dtype or torch.float32)}
    if plan.rank_by in EXTERNAL_RANKINGS and scores is not None:
        key["scores"] = tensors_fingerprint([torch.as_tensor(scores, dtype=torch.float32)])
    if plan.rank_by != "random" and batches is not None:
        key["calibration"] = tensors_fingerprint(
            t for b in batches for t in _calibration_inputs(b, "cpu").values())

    def build(out: Path) -> dict:
        from transformers import AutoTokenizer

        model = build_pruned(source, plan, batches, scores, dtype)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(source))
        except (OSError, ValueError) as e:  # a weights-only folder: the pair names its tokenizer
            log.info("pruned source %s has no tokenizer (%s); writing weights only", source, e)
            tokenizer = None
        _write_pruned(model, tokenizer, out, model.flexkd_pruning)
        record = model.flexkd_pruning
        return {"parameters": record["parameters"], "shape": record["shape"], "source": str(source)}

    def load(path: Path) -> Path:
        load_record(path)
        return path

    return get_or_build(cache_root, "pruned", key, build, load, version=CACHE_VERSION,
                        desc=f"pruned student of {source}")


def spec_plan(spec: Mapping[str, Any], total_layers: int) -> tuple[str, PrunePlan]:
    """(source, plan) of a model spec's `prune:` mapping: {from: <path|asset:name|hub name>,
    plan keys}; rank_by defaults to SPEC_RANKING, and `num_layers: n` is shorthand for
    keep_layers spread evenly over the source's `total_layers` blocks (first and last kept)."""
    spec = {"rank_by": SPEC_RANKING, **spec}
    source = spec.pop("from", None)
    if not source:
        raise ConfigError("prune: set `from` (a path, asset:<name> or hub name of the model to prune)")
    num_layers = spec.pop("num_layers", None)
    if num_layers is not None:
        if spec.get("keep_layers") is not None:
            raise ConfigError("prune: give num_layers or keep_layers, not both")
        spec["keep_layers"] = evenly_spaced_layers(total_layers, int(num_layers))
    plan = PrunePlan.from_dict(spec)
    if plan.keep_layers is not None:
        bad = [i for i in plan.keep_layers if not 0 <= i < total_layers]
        if bad or not plan.keep_layers or sorted(set(plan.keep_layers)) != list(plan.keep_layers):
            raise ConfigError(f"prune.keep_layers={list(plan.keep_layers)} must be increasing block "
                              f"indices in 0..{total_layers - 1}")
    return str(source), plan


def pruned_source(spec: Mapping[str, Any], resolve=lambda s: s, cache_root: str | Path | None = None,
                  calibration_batches: Iterable[Mapping] | None = None,
                  scores: torch.Tensor | None = None, dtype: torch.dtype | None = None):
    """(folder, flexkd.cache.EntryInfo) of a model spec's `prune:` source (see `spec_plan`)."""
    from transformers import AutoConfig

    from flexkd.storage import default_cache_dir

    folder = resolve(str(spec.get("from") or ""))
    source, plan = spec_plan(spec, int(AutoConfig.from_pretrained(folder).num_hidden_layers))
    path, info = cached_pruned(folder, plan, cache_root or default_cache_dir(), calibration_batches,
                               scores, dtype)
    log.info("pruned student %s (%s)", path, "cache hit" if info.cache_hit else "built")
    return path, info


def pruned_shape(spec: Mapping[str, Any], resolve=lambda s: s) -> tuple[Any, int, int]:
    """(source config, width, depth) a `prune:` spec will give, from the source's config only
    (for config validation before any weights load)."""
    from transformers import AutoConfig

    if not spec.get("from"):
        raise ConfigError("prune: set `from` (a path, asset:<name> or hub name of the model to prune)")
    config = AutoConfig.from_pretrained(resolve(str(spec["from"])))
    source, plan = spec_plan(spec, int(config.num_hidden_layers))
    depth = len(plan.keep_layers) if plan.keep_layers is not None else int(config.num_hidden_layers)
    width = plan.hidden_size or int(config.hidden_size)
    if width > int(config.hidden_size):
        raise ConfigError(f"prune.hidden_size={width} exceeds {source}'s hidden size {config.hidden_size}")
    return config, width, depth


def evenly_spaced_layers(total: int, keep: int) -> list[int]:
    """`keep` block indices spread over 0..total-1, first and last included."""
    if not 1 <= keep <= total:
        raise ConfigError(f"prune.num_layers={keep} must be in 1..{total}")
    if keep == 1:
        return [total - 1]
    return sorted({round(i * (total - 1) / (keep - 1)) for i in range(keep)})
