"""Stage 1 of Flex-KD: the importance probe (SPEC.md).

For each probe example, F = the teacher's score of the task target (log-prob of the gold or
predicted label / response tokens); g = dF/dh at the probed layer. Teacher dims are scored by
an aggregate of g (or h) over valid tokens and examples, and the top k kept. The
`directions` extension keeps the top-k eigenvectors of the gradient covariance instead.
Results are cached on disk under a content hash of everything they depend on.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from flexkd.cache import entry_key, get_or_build
from flexkd.errors import ConfigError
from flexkd.models import IGNORE_INDEX, TaskModel, response_positions
from flexkd.progress import progress

log = logging.getLogger(__name__)

SCORES = ("grad", "grad_x_act", "fisher", "activation", "random")
SELECTIONS = ("coordinates", "directions")
TARGETS = ("gold", "predicted")
EFFECTIVE_SHARES = (0.9, 0.95, 0.99)
CACHE_VERSION = 1
CACHE_KIND = "probe"


@dataclass(frozen=True)
class ProbeConfig:
    layer: int = -1
    score: str = "grad"
    selection: str = "coordinates"
    target: str = "gold"
    k: int = 0
    examples: int = 512
    batch_size: int = 16
    seed: int = 0  # only `random` scores depend on it

    def validate(self) -> None:
        for name, value, valid in (("score", self.score, SCORES),
                                   ("selection", self.selection, SELECTIONS),
                                   ("target", self.target, TARGETS)):
            if value not in valid:
                raise ConfigError(f"strategy.{name}={value!r} is not valid; choose one of {valid}")
        if self.k < 1:
            raise ConfigError(f"strategy.k must be >= 1, got {self.k}")
        if self.examples < 2:
            raise ConfigError(f"strategy.probe_examples must be >= 2 (two halves), got {self.examples}")


@dataclass
class ProbeResult:
    scores: torch.Tensor                 # (d_T,) importance per teacher dim (or eigenvalues)
    selection: torch.Tensor              # (k,) indices, or (d_T, k) directions
    stability: float                     # overlap of the selections from two disjoint halves
    effective_dims: dict[str, int]       # k_p for p in EFFECTIVE_SHARES
    examples: int
    key: str
    cache_hit: bool = False
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def diagnostics(self, max_spectrum: int = 4096) -> dict:
        spectrum = torch.sort(self.scores, descending=True).values
        info = {
            "key": self.key,
            "cache_hit": self.cache_hit,
            "seconds": round(self.seconds, 3),
            "examples": self.examples,
            "k": int(self.selection.shape[-1] if self.selection.dim() == 2 else self.selection.numel()),
            "effective_dims": self.effective_dims,
            "stability_overlap": round(self.stability, 4),
            "spectrum": [float(x) for x in spectrum[:max_spectrum]],
            **self.extra,
        }
        if self.selection.dim() == 1:
            info["selected"] = [int(i) for i in self.selection]
        return info


# ----------------------------------------------------------------------------- scoring

def score_mask(model: TaskModel, inputs: dict) -> torch.Tensor:
    """Tokens whose gradient counts: non-padding for classifiers; for causal LMs the positions
    that predict a response token (prompt and padding masked out)."""
    if model.kind == "causal_lm":
        return response_positions(inputs["labels"])
    return inputs["attention_mask"].bool()


def target_log_prob(model: TaskModel, out, inputs: dict, target: str) -> torch.Tensor:
    """Sum over the batch of F(x): the log-probability of the gold (or predicted) target."""
    if model.kind == "causal_lm":
        labels = inputs["labels"][:, 1:]
        # kd_logits: the rows that predict a response token, in the order of labels[valid].
        logp = F.log_softmax(out.kd_logits.float(), dim=-1)
        chosen = logp.argmax(-1) if target == "predicted" else labels[labels != IGNORE_INDEX]
        return logp.gather(-1, chosen.unsqueeze(-1)).sum()
    logp = F.log_softmax(out.logits.float(), dim=-1)
    chosen = logp.argmax(-1) if target == "predicted" else inputs["labels"]
    return logp.gather(-1, chosen.unsqueeze(-1)).sum()


def token_gradients(model: TaskModel, inputs: dict, layer: int, target: str):
    """(h, g, mask): hidden state at `layer`, dF/dh, and the valid-token mask, per token.

    Examples are independent (eval mode, no cross-example ops), so the gradient of the batch
    sum gives every example's own gradient in one backward pass.
    """
    out = model(inputs, layers=(layer,))
    h = out.hidden[layer]
    total = target_log_prob(model, out, inputs, target)
    (g,) = torch.autograd.grad(total, h)
    return h.detach().float(), g.float(), score_mask(model, inputs)


def _effective_dims(scores: torch.Tensor) -> dict[str, int]:
    s = torch.sort(scores.clamp_min(0), descending=True).values
    total = s.sum()
    if total <= 0:
        return {str(p): int(s.numel()) for p in EFFECTIVE_SHARES}
    share = torch.cumsum(s, 0) / total
    return {str(p): int(torch.searchsorted(share, torch.tensor(p - 1e-9)).item()) + 1
            for p in EFFECTIVE_SHARES}


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, in decreasing order of score (ties: lower index first)."""
    order = torch.sort(scores, descending=True, stable=True).indices
    return order[:k]


def top_directions(cov: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending) and the top-k eigenvectors (d, k) of a symmetric matrix."""
    vals, vecs = torch.linalg.eigh(cov.double())
    order = torch.argsort(vals, descending=True)
    return vals[order].float(), vecs[:, order[:k]].float()


def overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """Selection stability: |A ∩ B| / k for index sets, ||A^T B||_F^2 / k for subspaces."""
    if a.dim() == 1:
        k = a.numel()
        return len(set(a.tolist()) & set(b.tolist())) / max(k, 1)
    return float((a.T @ b).pow(2).sum() / a.shape[1])


def token_scores(score: str, h: torch.Tensor, g: torch.Tensor | None,
                 mask: torch.Tensor) -> torch.Tensor:
    """(B, d) per-example sums over valid tokens of the chosen score."""
    m = mask.unsqueeze(-1).float()
    if score == "grad":
        per_token = g.abs()
    elif score == "grad_x_act":
        per_token = (g * h).abs()
    elif score == "fisher":
        per_token = g.pow(2)
    elif score == "activation":
        per_token = h.abs()
    else:  # random: scores are drawn after the pass
        per_token = torch.zeros_like(h)
    return (per_token * m).sum(1)


def run_probe(teacher: TaskModel, loader, cfg: ProbeConfig) -> ProbeResult:
    """Compute scores and the selection on the probe set (no cache; see `cached_probe`)."""
    cfg.validate()
    layer = teacher.layer_index(cfg.layer)
    d = teacher.hidden_size
    k = min(cfg.k, d)
    was_training = teacher.training
    teacher.eval()
    # dF/dh needs a graph through h; a frozen teacher has none unless its weights track grads.
    # (autograd.grad w.r.t. h computes no weight gradients.)
    frozen = [p for p in teacher.parameters() if not p.requires_grad]
    for p in frozen:
        p.requires_grad_(True)
    # Per-half accumulators (example n goes to half n % 2) give stability for free.
    sums = torch.zeros(2, d, dtype=torch.float64)
    covs = torch.zeros(2, d, d, dtype=torch.float64) if cfg.selection == "directions" else None
    counts = torch.zeros(2, dtype=torch.float64)
    token_counts = torch.zeros(2, dtype=torch.float64)
    seen = 0
    device = next(teacher.parameters()).device
    try:
        for batch in progress(loader, "importance probe"):
            inputs = {key: v.to(device) for key, v in batch["teacher"].items()}
            half = (batch["index"] % 2).to(device)
            if cfg.score in ("activation", "random") and covs is None:
                with torch.no_grad():
                    out = teacher(inputs, layers=(layer,))
                h, g, mask = out.hidden[layer].float(), None, score_mask(teacher, inputs)
            else:
                with torch.enable_grad():
                    h, g, mask = token_gradients(teacher, inputs, layer, cfg.target)
            per_example = token_scores(cfg.score, h, g, mask)
            for part in (0, 1):
                sel = half == part
                sums[part] += per_example[sel].sum(0).double().cpu()
                counts[part] += sel.sum().item()
                if covs is not None:
                    rows = g[sel][mask[sel]].double()
                    covs[part] += (rows.T @ rows).cpu()
                    token_counts[part] += rows.shape[0]
            seen += h.shape[0]
    finally:
        teacher.train(was_training)
        for p in frozen:
            p.requires_grad_(False)

    extra: dict = {"layer": layer, "score": cfg.score, "selection": cfg.selection,
                   "target": cfg.target, "teacher_width": d}
    if cfg.score == "random":
        gen = torch.Generator().manual_seed(cfg.seed)
        halves = torch.rand(2, d, generator=gen, dtype=torch.float64)
        scores = torch.rand(d, generator=gen, dtype=torch.float64)
    else:
        halves = sums / counts.clamp_min(1).unsqueeze(-1)
        scores = sums.sum(0) / counts.sum().clamp_min(1)

    if covs is not None:
        cov = covs.sum(0) / token_counts.sum().clamp_min(1)
        eigvals, selection = top_directions(cov, k)
        _, a = top_directions(covs[0] / token_counts[0].clamp_min(1), k)
        _, b = top_directions(covs[1] / token_counts[1].clamp_min(1), k)
        rank = int((eigvals > eigvals.max().clamp_min(1e-30) * 1e-6).sum())
        extra["informative_directions"] = rank
        if rank < k:
            log.warning("gradient covariance at layer %d has rank %d < k=%d: only %d directions "
                        "carry task signal (a linear head over C classes gives rank <= C-1)",
                        layer, rank, k, rank)
        result_scores, stability = eigvals.clamp_min(0), overlap(a, b)
    else:
        result_scores = scores.float()
        selection = top_k(result_scores, k)
        stability = overlap(top_k(halves[0].float(), k), top_k(halves[1].float(), k))
    return ProbeResult(scores=result_scores, selection=selection, stability=stability,
                       effective_dims=_effective_dims(result_scores), examples=seen, key="",
                       extra=extra)


# ----------------------------------------------------------------------------- cache

PROBE_FILE = "probe.pt"


def probe_key_object(cfg: ProbeConfig, teacher_fingerprint: str, data_fingerprint: dict) -> dict:
    """What a probe result depends on (the seed only matters to `random` scores)."""
    fields = cfg.__dict__ | {"seed": cfg.seed if cfg.score == "random" else None}
    return {"cfg": fields, "teacher": teacher_fingerprint, "data": data_fingerprint}


def _save(out: Path, result: ProbeResult) -> dict:
    torch.save({"scores": result.scores, "selection": result.selection,
                "stability": result.stability, "effective_dims": result.effective_dims,
                "examples": result.examples, "extra": result.extra}, out / PROBE_FILE)
    return {"examples": result.examples, "stability_overlap": round(result.stability, 4)}


def _load(entry: Path) -> ProbeResult:
    blob = torch.load(entry / PROBE_FILE, weights_only=True)
    return ProbeResult(scores=blob["scores"], selection=blob["selection"],
                       stability=blob["stability"], effective_dims=blob["effective_dims"],
                       examples=blob["examples"], key="", extra=blob["extra"])


def cached_probe(teacher: TaskModel, loader, cfg: ProbeConfig, cache_dir: str | Path | None,
                 teacher_fingerprint: str, data_fingerprint: dict) -> ProbeResult:
    """run_probe, memoised on disk (a `flexkd.cache` entry ``<cache_dir>/probe/<key>/``) under a
    content hash of (config, teacher, data); no cache when `cache_dir` is empty."""
    start = time.perf_counter()
    key_obj = probe_key_object(cfg, teacher_fingerprint, data_fingerprint)
    if not cache_dir:
        result = run_probe(teacher, loader, cfg)
        result.key = entry_key(CACHE_KIND, key_obj, CACHE_VERSION)
    else:
        result, entry = get_or_build(Path(cache_dir), CACHE_KIND, key_obj,
                                     lambda out: _save(out, run_probe(teacher, loader, cfg)),
                                     _load, version=CACHE_VERSION, desc="importance probe")
        result.key, result.cache_hit = entry.key, entry.cache_hit
        log.info("importance probe: %s %s", "cache hit" if entry.cache_hit else
                 f"computed on {result.examples} examples, cached at", entry.path)
    result.seconds = time.perf_counter() - start
    return result
