"""Pure tensor loss functions. No nn state, no config: strategies compose these.

Token features arrive as (B, L, d) with a (B, L) boolean mask; `masked_tokens` selects the valid
rows first, so padding never influences a loss. Logit losses take (N, V) rows of valid positions.

- Feature losses: `correlation_loss` (Flex-KD's L_corr on z-scored columns), `mse`,
  `cosine_loss`, `cka_loss` / `linear_cka`.
- Logit KD over one vocabulary: `logit_divergence(kind=...)` with every name in `DIVERGENCES`:
  forward / reverse KL, JSD, DistiLLM's skew KL and skew reverse KL (`skew` = mixing weight),
  and `uld` (which alone accepts two vocabularies, see `uld_loss`).
- Logit KD at vocabulary scale: `teacher_topk` (what a teacher-output store keeps) with
  `topk_logit_divergence` (teacher top-k plus one leftover bucket; k = V is the dense loss), and
  `chunked_logit_divergence` (row chunks, recomputed in backward; from hidden states and the LM
  head it never materialises the (N, V) logits).

Precision: every public loss reduces in fp32 (fp64 stays fp64), also inside `torch.autocast`.
Upcasting alone is not enough there, because autocast re-casts matmul inputs to bf16 whatever
their dtype; the `_fp32` decorator therefore also switches autocast off for the call.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from flexkd.errors import ConfigError

EPS = 1e-6
# Divergences over one shared vocabulary (dense, top-k and chunked forms all accept these).
SHARED_VOCAB_DIVERGENCES = ("forward", "reverse", "jsd", "skl", "srkl")
# Every `kind` that `logit_divergence` accepts; `uld` also works across vocabularies.
DIVERGENCES = (*SHARED_VOCAB_DIVERGENCES, "uld")
# zscore: a column whose spread is below this many ulps of its magnitude is rounding residue
# (what centring a constant column leaves), so it counts as constant and maps to ~0.
ZSCORE_ROUNDING_ULPS = 16.0
# zscore: absolute variance floor, only for all-zero columns (so 0/0 never happens). Far below
# any real feature's variance, so scale invariance holds down to a spread of about 1e-8.
ZSCORE_VARIANCE_FLOOR = 1e-20


def _upcast(x):
    """Half-precision tensors become fp32; fp32/fp64 tensors and non-tensors pass unchanged."""
    if isinstance(x, torch.Tensor) and x.dtype in (torch.float16, torch.bfloat16):
        return x.float()
    return x


def _autocast_off(fn):
    """Run `fn` with autocast disabled on the device of its first tensor argument."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        device_type = next((a.device.type for a in (*args, *kwargs.values())
                            if isinstance(a, torch.Tensor)), None)
        if device_type is None or not torch.is_autocast_enabled(device_type):
            return fn(*args, **kwargs)
        with torch.autocast(device_type=device_type, enabled=False):
            return fn(*args, **kwargs)

    return wrapper


def _fp32(fn):
    """A public loss: half-precision tensor arguments are upcast and autocast is off inside."""
    inner = _autocast_off(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return inner(*(_upcast(a) for a in args), **{k: _upcast(v) for k, v in kwargs.items()})

    return wrapper


def masked_tokens(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, L, d) features and a (B, L) mask -> (M, d) rows of the valid tokens."""
    if x.shape[:2] != mask.shape:
        raise ValueError(f"features {tuple(x.shape)} and mask {tuple(mask.shape)} do not align")
    return x[mask.bool()]


# ---------------------------------------------------------------- feature losses

@_fp32
def zscore(x: torch.Tensor) -> torch.Tensor:
    """Standardise each column over rows; invariant to a positive scale and a shift per column.

    The epsilon is relative to the column's own magnitude (mean of squares), so scaling a column
    scales its variance and its epsilon alike; a constant column maps to 0 with finite gradients.
    """
    centered = x - x.mean(dim=0, keepdim=True)
    # Second pass: removes the rounding residue of the first mean, which for a constant column
    # is the same in every row (the corrected two-pass algorithm).
    centered = centered - centered.mean(dim=0, keepdim=True)
    var = centered.pow(2).mean(dim=0, keepdim=True)
    rel = (ZSCORE_ROUNDING_ULPS * torch.finfo(x.dtype).eps) ** 2
    eps = rel * x.pow(2).mean(dim=0, keepdim=True) + ZSCORE_VARIANCE_FLOOR
    return centered / torch.sqrt(var + eps)


@_fp32
def cross_correlation(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """(M, k) x (M, k) -> (k, k) matrix C_ij = mean_t z(s)_ti z(t)_tj."""
    m = student.shape[0]
    return zscore(student).T @ zscore(teacher) / max(m, 1)


@_fp32
def correlation_loss(
    student: torch.Tensor, teacher: torch.Tensor, lam: float = 5e-3, reduction: str = "mean"
) -> torch.Tensor:
    """SPEC L_corr: sum_i (1 - C_ii)^2 + lam * sum_{i!=j} C_ij^2, divided by k for 'mean'.

    Inputs are (M, k) token rows already paired column by column (student dim i <-> teacher
    dim S[i]). Invariant to any per-column positive affine map of either input.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"correlation loss needs paired (M, k) inputs, got {tuple(student.shape)} "
                         f"and {tuple(teacher.shape)}")
    c = cross_correlation(student, teacher)
    diag = torch.diagonal(c)
    on = (1.0 - diag).pow(2).sum()
    off = c.pow(2).sum() - diag.pow(2).sum()
    loss = on + lam * off
    if reduction == "mean":
        return loss / c.shape[0]
    if reduction == "sum":
        return loss
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


@_fp32
def mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared error over (M, d) token rows (mean over tokens and dims)."""
    if student.shape != teacher.shape:
        raise ValueError(f"MSE needs equal shapes, got {tuple(student.shape)} and {tuple(teacher.shape)}")
    if student.numel() == 0:
        return student.sum() * 0.0
    return F.mse_loss(student, teacher)


@_fp32
def cosine_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of 1 - cos(student_t, teacher_t)."""
    if student.shape[0] == 0:
        return student.sum() * 0.0
    return (1.0 - F.cosine_similarity(student, teacher, dim=-1, eps=EPS)).mean()


@_fp32
def linear_cka(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Linear CKA between (M, d1) and (M, d2) token features, in [0, 1].

    CKA = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) on column-centred features. Computed
    with the d x d Gram forms so memory stays O(d^2), not O(M^2).
    """
    x = x - x.mean(dim=0, keepdim=True)
    y = y - y.mean(dim=0, keepdim=True)
    cross = (y.T @ x).pow(2).sum()
    # Clamp before sqrt (one valid token centres to zero, and sqrt'(0) gives NaN grads), at the
    # dtype's tiny so that the clamp never touches real features, whose norms scale as scale^4.
    tiny = torch.finfo(x.dtype).tiny
    norm_x = (x.T @ x).pow(2).sum().clamp_min(tiny).sqrt()
    norm_y = (y.T @ y).pow(2).sum().clamp_min(tiny).sqrt()
    return cross / (norm_x * norm_y)


@_fp32
def cka_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 1.0 - linear_cka(x, y)


# ---------------------------------------------------------------- logit divergences

def _check_kind(kind: str, allowed: tuple[str, ...]) -> None:
    if kind not in allowed:
        raise ConfigError(f"unknown divergence {kind!r}; choose one of {', '.join(allowed)}")


def _check_temperature_and_skew(temperature: float, skew: float) -> None:
    if not temperature > 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= skew <= 1.0:
        raise ConfigError(f"skew (the mixing weight of skl/srkl) must be in [0, 1], got {skew}")


def _kl_rows(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Per-row KL(p || q) from log-probabilities; entries with p = 0 contribute exactly 0."""
    p = log_p.exp()
    # Masked, not p * (log_p - log_q) alone: with log_p = -inf that is 0 * -inf = NaN.
    # vecdot: no (N, V) product tensor.
    return torch.linalg.vecdot(p, (log_p - log_q).masked_fill(p == 0, 0.0))


def _log_mix(log_p: torch.Tensor, log_q: torch.Tensor, weight: float) -> torch.Tensor:
    """log(weight * p + (1 - weight) * q), computed stably from log-probabilities."""
    if weight == 0.0:
        return log_q
    if weight == 1.0:
        return log_p
    return torch.logaddexp(log_p + math.log(weight), log_q + math.log1p(-weight))


def _divergence_rows(log_s: torch.Tensor, log_t: torch.Tensor, kind: str, skew: float) -> torch.Tensor:
    """Per-row divergence between teacher p = exp(log_t) and student q = exp(log_s)."""
    if kind == "forward":
        return _kl_rows(log_t, log_s)
    if kind == "reverse":
        return _kl_rows(log_s, log_t)
    if kind == "jsd":
        log_m = _log_mix(log_t, log_s, 0.5)
        return 0.5 * (_kl_rows(log_t, log_m) + _kl_rows(log_s, log_m))
    if kind == "skl":  # KL(p || a p + (1 - a) q)
        return _kl_rows(log_t, _log_mix(log_t, log_s, skew))
    if kind == "srkl":  # KL(q || (1 - a) p + a q)
        return _kl_rows(log_s, _log_mix(log_t, log_s, 1.0 - skew))
    raise AssertionError(kind)  # callers check kind first


@_fp32
def logit_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 2.0,
    kind: str = "forward",
    skew: float = 0.1,
) -> torch.Tensor:
    """Divergence between (N, V) teacher (p) and student (q) distributions at temperature T,
    times T^2, mean over the N rows.

    forward: KL(p || q) (standard KD); reverse: KL(q || p); jsd: Jensen-Shannon divergence;
    skl: KL(p || a p + (1-a) q) and srkl: KL(q || (1-a) p + a q), DistiLLM's skew divergences
    (Ko et al. 2024) with a = `skew`; a = 0 gives forward / reverse KL.
    uld: `uld_loss` (the only kind that accepts two vocabulary sizes; no T^2 factor).
    """
    _check_kind(kind, DIVERGENCES)
    _check_temperature_and_skew(temperature, skew)
    if kind == "uld":
        return uld_loss(student_logits, teacher_logits, temperature)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"logit KD needs the same label space / vocabulary: student logits "
            f"{tuple(student_logits.shape)} vs teacher {tuple(teacher_logits.shape)}"
        )
    if student_logits.shape[0] == 0:
        return student_logits.sum() * 0.0
    t = float(temperature)
    log_s = F.log_softmax(student_logits / t, dim=-1)
    log_t = F.log_softmax(teacher_logits / t, dim=-1)
    return _divergence_rows(log_s, log_t, kind, skew).mean() * t * t


@_fp32
def uld_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
             temperature: float = 1.0) -> torch.Tensor:
    """Universal Logit Distillation (Boizard et al. 2024), a cross-vocabulary baseline.

    L1 distance between the teacher's and the student's probability vectors at temperature T,
    each sorted in decreasing order, the shorter one padded with zeros; mean over the N rows.
    It compares the shapes of the two distributions, not which token gets which mass, so it
    needs no shared vocabulary (rows must be aligned positions). No T^2 factor (as the paper).
    """
    if student_logits.shape[0] != teacher_logits.shape[0]:
        raise ValueError(f"ULD needs one row per aligned position on both sides, got "
                         f"{student_logits.shape[0]} student and {teacher_logits.shape[0]} teacher rows")
    if not temperature > 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}")
    if student_logits.shape[0] == 0:
        return student_logits.sum() * 0.0
    p_s = F.softmax(student_logits / temperature, dim=-1).sort(dim=-1, descending=True).values
    p_t = F.softmax(teacher_logits / temperature, dim=-1).sort(dim=-1, descending=True).values
    width = max(p_s.shape[-1], p_t.shape[-1])
    p_s = F.pad(p_s, (0, width - p_s.shape[-1]))
    p_t = F.pad(p_t, (0, width - p_t.shape[-1]))
    return (p_s - p_t).abs().sum(dim=-1).mean()


# ---------------------------------------------------------------- top-k logit KD

class TeacherTopK(NamedTuple):
    """What a teacher-output store keeps per position (all at the training temperature)."""

    logprobs: torch.Tensor  # (N, k) teacher log-probabilities of its k most likely ids, descending
    ids: torch.Tensor  # (N, k) int64 vocabulary ids of those
    rest_logprob: torch.Tensor  # (N,) log of the mass outside the top k (-inf when k = V)


@_fp32
def teacher_topk(teacher_logits: torch.Tensor, k: int, temperature: float) -> TeacherTopK:
    """Top-k log-probabilities at `temperature` (the one training will use) and the leftover mass.

    The leftover is computed from the full logits (a logsumexp over the other ids), not as
    1 - sum(top k): that difference loses all precision once the top k hold nearly all the mass,
    and more so after the store rounds log-probs to bf16.
    """
    vocab = teacher_logits.shape[-1]
    if not 1 <= k <= vocab:
        raise ConfigError(f"top-k logit KD needs 1 <= k <= vocabulary size {vocab}, got k={k}")
    if not temperature > 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}")
    log_p = F.log_softmax(teacher_logits / temperature, dim=-1)
    logprobs, ids = log_p.topk(k, dim=-1)
    rest = log_p.scatter(-1, ids, -math.inf).logsumexp(dim=-1)
    return TeacherTopK(logprobs, ids, rest)


@_fp32
def topk_logit_divergence(
    student_logits: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    temperature: float = 2.0,
    kind: str = "forward",
    skew: float = 0.1,
    teacher_rest_logprob: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logit KD against a stored teacher top-k, the leftover mass as one extra bucket, times T^2.

    Both distributions are collapsed to k + 1 buckets: the teacher's top-k ids and "the rest".
    The student's side is its softmax at T on those ids plus its mass on all other ids. The
    teacher's log-probs must have been computed at this same T (`teacher_topk`): the leftover
    mass cannot be re-tempered. Its leftover bucket is `teacher_rest_logprob` when stored, else
    1 - sum(top k) (floored at the dtype's tiny); its k + 1 buckets are renormalised, which
    undoes the bf16 rounding of a store. With k = V there is no leftover and this equals
    `logit_divergence`. Ids in a row must be distinct.
    """
    _check_kind(kind, SHARED_VOCAB_DIVERGENCES)
    _check_temperature_and_skew(temperature, skew)
    if teacher_topk_logprobs.shape != teacher_topk_ids.shape or teacher_topk_ids.dim() != 2:
        raise ValueError(f"teacher top-k log-probs {tuple(teacher_topk_logprobs.shape)} and ids "
                         f"{tuple(teacher_topk_ids.shape)} must both be (N, k)")
    n, vocab = student_logits.shape
    k = teacher_topk_ids.shape[1]
    if teacher_topk_ids.shape[0] != n:
        raise ValueError(f"student logits have {n} rows, the teacher top-k {teacher_topk_ids.shape[0]}")
    if not 1 <= k <= vocab:
        raise ConfigError(f"top-k logit KD needs 1 <= k <= vocabulary size {vocab}, got k={k}")
    if n == 0:
        return student_logits.sum() * 0.0
    t = float(temperature)
    ids = teacher_topk_ids.long()
    log_s_all = F.log_softmax(student_logits / t, dim=-1)
    log_s = log_s_all.gather(-1, ids)
    log_t = teacher_topk_logprobs
    if k < vocab:
        rest_s = log_s_all.scatter(-1, ids, -math.inf).logsumexp(dim=-1)
        if teacher_rest_logprob is None:
            tiny = torch.finfo(log_t.dtype).tiny
            teacher_rest_logprob = (1.0 - log_t.exp().sum(dim=-1)).clamp_min(tiny).log()
        log_s = torch.cat([log_s, rest_s[:, None]], dim=-1)
        log_t = torch.cat([log_t, teacher_rest_logprob.to(log_t.dtype)[:, None]], dim=-1)
    log_t = F.log_softmax(log_t, dim=-1)
    return _divergence_rows(log_s, log_t, kind, skew).mean() * t * t


# ---------------------------------------------------------------- chunked logit KD

def _chunk_logits(rows: torch.Tensor, head: torch.Tensor | None) -> torch.Tensor:
    rows = _upcast(rows)
    if head is None:
        return rows
    dtype = torch.promote_types(rows.dtype, head.dtype)
    return rows.to(dtype) @ head.to(dtype).T


def _chunk_divergence_sum(s_rows, t_rows, s_head, t_head, temperature, kind, skew):
    log_s = F.log_softmax(_chunk_logits(s_rows, s_head) / temperature, dim=-1)
    log_t = F.log_softmax(_chunk_logits(t_rows, t_head) / temperature, dim=-1)
    return _divergence_rows(log_s, log_t, kind, skew).sum()


@_autocast_off  # upcasts per chunk: a whole-input upcast would be the fp32 copy we avoid
def chunked_logit_divergence(
    student: torch.Tensor,
    teacher: torch.Tensor,
    temperature: float = 2.0,
    kind: str = "forward",
    skew: float = 0.1,
    *,
    student_head: torch.Tensor | None = None,
    teacher_head: torch.Tensor | None = None,
    chunk_rows: int = 256,
) -> torch.Tensor:
    """`logit_divergence` computed over chunks of rows, for (positions x vocabulary) at scale.

    `student` is (N, V) logits, or (N, d) hidden rows when `student_head`, the (V, d) LM-head
    weight, is given (logits = rows @ head.T); the same for `teacher` / `teacher_head`. Each
    chunk's fp32 logits and softmaxes are built, reduced to one number and dropped; backward
    recomputes them chunk by chunk (activation checkpointing). So at most one chunk of fp32
    (chunk_rows x V) tensors is alive; with heads the full logits never exist, with logits the
    only full-size tensors are the inputs and their gradient, in the inputs' dtype.
    Equal to `logit_divergence` on the full logits, values and gradients.
    """
    _check_kind(kind, SHARED_VOCAB_DIVERGENCES)
    _check_temperature_and_skew(temperature, skew)
    if chunk_rows < 1:
        raise ConfigError(f"chunk_rows must be >= 1, got {chunk_rows}")
    n = student.shape[0]
    if teacher.shape[0] != n:
        raise ValueError(f"student has {n} rows, teacher {teacher.shape[0]}")
    heads = (_upcast(student_head), _upcast(teacher_head))
    vocab = [x.shape[-1] if h is None else h.shape[0] for x, h in ((student, heads[0]), (teacher, heads[1]))]
    if vocab[0] != vocab[1]:
        raise ValueError(f"logit KD needs the same vocabulary: student {vocab[0]} vs teacher {vocab[1]}")
    for rows, head, side in ((student, heads[0], "student"), (teacher, heads[1], "teacher")):
        if head is not None and head.shape[1] != rows.shape[-1]:
            raise ValueError(f"{side} head {tuple(head.shape)} does not map its rows {tuple(rows.shape)}")
    if n == 0:
        return student.float().sum() * 0.0
    t = float(temperature)
    needs_grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (student, teacher, *heads))
    total = 0.0
    # torch.split, not slicing: one SplitBackward concatenates the chunk gradients once, where
    # each slice's backward would allocate a full-size zero gradient.
    for s_rows, t_rows in zip(student.split(chunk_rows), teacher.split(chunk_rows), strict=True):
        args = (s_rows, t_rows, heads[0], heads[1], t, kind, skew)
        if needs_grad:
            total = total + checkpoint(_chunk_divergence_sum, *args, use_reentrant=False)
        else:
            total = total + _chunk_divergence_sum(*args)
    return total / n * t * t
