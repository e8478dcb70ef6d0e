"""Pure tensor loss functions. No nn state, no config: strategies compose these.

Token features arrive as (B, L, d) with a (B, L) boolean mask; every function here selects
the masked tokens first, so padding never influences a loss.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

EPS = 1e-6


def masked_tokens(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, L, d) features and a (B, L) mask -> (M, d) rows of the valid tokens."""
    if x.shape[:2] != mask.shape:
        raise ValueError(f"features {tuple(x.shape)} and mask {tuple(mask.shape)} do not align")
    return x[mask.bool()]


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Half-precision inputs are reduced in fp32; fp32/fp64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def zscore(x: torch.Tensor) -> torch.Tensor:
    """Standardise each column over rows. A constant column maps to 0 rather than NaN."""
    x = _upcast(x)
    centered = x - x.mean(dim=0, keepdim=True)
    var = centered.pow(2).mean(dim=0, keepdim=True)
    return centered / torch.sqrt(var + EPS)


def cross_correlation(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """(M, k) x (M, k) -> (k, k) matrix C_ij = mean_t z(s)_ti z(t)_tj."""
    m = student.shape[0]
    return zscore(student).T @ zscore(teacher) / max(m, 1)


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


def mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared error over (M, d) token rows (mean over tokens and dims)."""
    if student.shape != teacher.shape:
        raise ValueError(f"MSE needs equal shapes, got {tuple(student.shape)} and {tuple(teacher.shape)}")
    if student.numel() == 0:
        return student.sum() * 0.0
    return F.mse_loss(_upcast(student), _upcast(teacher))


def cosine_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of 1 - cos(student_t, teacher_t)."""
    if student.shape[0] == 0:
        return student.sum() * 0.0
    return (1.0 - F.cosine_similarity(_upcast(student), _upcast(teacher), dim=-1, eps=EPS)).mean()


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Linear CKA between (M, d1) and (M, d2) token features, in [0, 1].

    CKA = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) on column-centred features. Computed
    with the d x d Gram forms so memory stays O(d^2), not O(M^2).
    """
    x, y = _upcast(x), _upcast(y)
    x = x - x.mean(dim=0, keepdim=True)
    y = y - y.mean(dim=0, keepdim=True)
    cross = (y.T @ x).pow(2).sum()
    # clamp before sqrt: one valid token centres to zero, and sqrt'(0) would give NaN grads.
    norm_x = (x.T @ x).pow(2).sum().clamp_min(EPS).sqrt()
    norm_y = (y.T @ y).pow(2).sum().clamp_min(EPS).sqrt()
    return cross / (norm_x * norm_y)


def cka_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 1.0 - linear_cka(x, y)


def logit_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 2.0,
    kind: str = "forward",
) -> torch.Tensor:
    """Divergence between (N, V) teacher and student distributions at temperature T, times T^2.

    forward: KL(teacher || student) (standard KD); reverse: KL(student || teacher);
    jsd: Jensen-Shannon divergence. Mean over the N rows.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"logit KD needs the same label space / vocabulary: student logits "
            f"{tuple(student_logits.shape)} vs teacher {tuple(teacher_logits.shape)}"
        )
    if student_logits.shape[0] == 0:
        return student_logits.sum() * 0.0
    t = float(temperature)
    log_s = F.log_softmax(_upcast(student_logits) / t, dim=-1)
    log_t = F.log_softmax(_upcast(teacher_logits) / t, dim=-1)
    if kind == "forward":
        div = F.kl_div(log_s, log_t, log_target=True, reduction="batchmean")
    elif kind == "reverse":
        div = F.kl_div(log_t, log_s, log_target=True, reduction="batchmean")
    elif kind == "jsd":
        log_m = torch.logsumexp(torch.stack([log_s, log_t]), dim=0) - math.log(2.0)
        div = 0.5 * (
            F.kl_div(log_m, log_s, log_target=True, reduction="batchmean")
            + F.kl_div(log_m, log_t, log_target=True, reduction="batchmean")
        )
    else:
        raise ValueError(f"unknown divergence {kind!r}; choose forward, reverse or jsd")
    return div * t * t
