"""Numerics (fp32 under autocast, scale-relative z-score), logit KD at vocabulary scale (top-k with
a leftover bucket, chunked), DistiLLM's skew divergences and ULD, against dense references and
hand-computed values."""

import math

import pytest
import torch

from flexkd import losses
from flexkd.errors import ConfigError


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative difference of b to reference a (norm of the difference over the norm of a)."""
    return ((a - b).norm() / a.norm().clamp_min(1e-30)).item()


# ---------------------------------------------------------------- fp32 inside autocast

def _near_converged_features(m=512, k=64):
    gen = _gen(0)
    teacher = torch.randn(m, k, generator=gen)
    student = teacher + 0.05 * torch.randn(m, k, generator=gen)
    return student, teacher


def _logits(n=64, v=100, seed=1):
    gen = _gen(seed)
    teacher = 3 * torch.randn(n, v, generator=gen)
    return teacher + 0.3 * torch.randn(n, v, generator=gen), teacher


def _autocast_cases():
    s, t = _near_converged_features()
    ls, lt = _logits()
    cases = {
        "correlation": (losses.correlation_loss, (s, t), {}),
        "cka": (losses.cka_loss, (s, t[:, :48]), {}),
        "mse": (losses.mse, (s, t), {}),
        "cosine": (losses.cosine_loss, (s, t), {}),
    }
    for kind in losses.DIVERGENCES:
        teacher = torch.cat([lt, lt[:, :20]], dim=1) if kind == "uld" else lt  # ULD: two vocab sizes
        cases[f"logit_{kind}"] = (losses.logit_divergence, (ls, teacher, 2.0, kind), {})
    top = losses.teacher_topk(lt, 10, 2.0)
    cases["topk"] = (losses.topk_logit_divergence, (ls, top.logprobs, top.ids, 2.0, "forward"),
                     {"teacher_rest_logprob": top.rest_logprob})
    cases["chunked_logits"] = (losses.chunked_logit_divergence, (ls, lt, 2.0, "jsd"), {"chunk_rows": 16})
    head = torch.randn(100, 64, generator=_gen(2)) / 8
    cases["chunked_head"] = (losses.chunked_logit_divergence, (s[:64], t[:64]),
                             {"student_head": head, "teacher_head": head, "chunk_rows": 16})
    return cases


@pytest.mark.parametrize("name", list(_autocast_cases()))
def test_every_loss_reduces_in_fp32_inside_bf16_autocast(name):
    fn, args, kwargs = _autocast_cases()[name]

    def loss_and_grads(autocast: bool):
        inputs = [a.clone().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point()
                  else a for a in args]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = fn(*inputs, **kwargs)
        grads = torch.autograd.grad(loss, [x for x in inputs if isinstance(x, torch.Tensor)
                                           and x.requires_grad])
        return loss, grads

    ref, ref_grads = loss_and_grads(False)
    got, got_grads = loss_and_grads(True)
    assert got.dtype == torch.float32
    assert _rel(ref, got) < 1e-3
    for a, b in zip(ref_grads, got_grads, strict=True):
        assert _rel(a, b) < 1e-3


def test_bf16_autocast_would_change_these_inputs_without_the_guard():
    # The test above can fail: on the same inputs, the unguarded matmuls under autocast move the
    # correlation loss's gradient by > 1% (measured 3.6%) and CKA by > 1e-3.
    s0, t = _near_converged_features()

    def corr_from(c):
        diag = torch.diagonal(c)
        return ((1 - diag).pow(2).sum() + 5e-3 * (c.pow(2).sum() - diag.pow(2).sum())) / c.shape[0]

    s = s0.clone().requires_grad_()
    (ref_grad,) = torch.autograd.grad(losses.correlation_loss(s, t), s)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        unguarded = corr_from(losses.cross_correlation.__wrapped__(s, t))
        unguarded_cka = losses.linear_cka.__wrapped__(s0, t[:, :48])
    (unguarded_grad,) = torch.autograd.grad(unguarded, s)
    assert _rel(ref_grad, unguarded_grad.float()) > 1e-2
    assert _rel(1 - losses.linear_cka(s0, t[:, :48]), 1 - unguarded_cka.float()) > 1e-3


# ---------------------------------------------------------------- scale-relative z-score

def test_correlation_loss_is_scale_invariant_also_for_small_spread_columns():
    # Columns of spread 1e-4..1 around a mean of 1 (the failure: an absolute 1e-6 inside
    # the square root dominated their variance once scaled by 1e-3).
    gen = _gen(3)
    t = torch.randn(256, 32, generator=gen)
    s = t + 0.5 * torch.randn(256, 32, generator=gen)
    spread = torch.logspace(-4, 0, 32)
    s, t = 1.0 + s * spread, t * spread
    base = losses.correlation_loss(s, t).item()
    assert base > 1e-2  # not trivially 0
    for factor in (1e-3, 1e3):
        assert abs(losses.correlation_loss(s * factor, t).item() - base) < 1e-4
        assert abs(losses.correlation_loss(s, t * factor).item() - base) < 1e-4


@pytest.mark.parametrize("value", [0.0, 3.7, -1234.567])
def test_constant_column_maps_to_zero_with_finite_gradients(value):
    s, t = _near_converged_features(m=100, k=4)
    s = s.clone()
    s[:, 1] = value
    z = losses.zscore(s)
    assert z[:, 1].abs().max().item() < 1e-6
    s.requires_grad_()
    loss = losses.correlation_loss(s, t, lam=0.0, reduction="sum")
    loss.backward()
    assert torch.isfinite(s.grad).all()
    # The constant dim has C_ii = 0 and so contributes exactly (1 - 0)^2 = 1.
    rest = losses.correlation_loss(s[:, [0, 2, 3]], t[:, [0, 2, 3]], lam=0.0, reduction="sum")
    assert loss.item() == pytest.approx(rest.item() + 1.0, abs=1e-5)


def test_cka_is_scale_invariant_for_small_features():
    gen = _gen(2)
    x, y = torch.randn(40, 8, generator=gen), torch.randn(40, 5, generator=gen)
    base = losses.linear_cka(x, y).item()
    assert losses.linear_cka(1e-3 * x, y).item() == pytest.approx(base, rel=1e-4)
    assert losses.linear_cka(x, 1e3 * y).item() == pytest.approx(base, rel=1e-4)


# ---------------------------------------------------------------- DistiLLM skew divergences

P_T = (0.5, 0.3, 0.2)  # teacher
Q_S = (0.25, 0.25, 0.5)  # student


def _one_row(probs):
    return torch.tensor([[math.log(p) for p in probs]], dtype=torch.float64)


def test_skew_kl_hand_computed():
    # a = 0.1: a p + (1 - a) q = (0.05 + 0.225, 0.03 + 0.225, 0.02 + 0.45) = (0.275, 0.255, 0.47)
    # SKL = 0.5 ln(0.5/0.275) + 0.3 ln(0.3/0.255) + 0.2 ln(0.2/0.47)
    #     = 0.5 * 0.597837 + 0.3 * 0.162519 + 0.2 * (-0.854415) = 0.176791
    expected = 0.5 * math.log(0.5 / 0.275) + 0.3 * math.log(0.3 / 0.255) + 0.2 * math.log(0.2 / 0.47)
    assert expected == pytest.approx(0.176791, abs=1e-6)
    value = losses.logit_divergence(_one_row(Q_S), _one_row(P_T), 1.0, "skl", skew=0.1)
    assert value.item() == pytest.approx(expected, rel=1e-9)


def test_skew_reverse_kl_hand_computed():
    # a = 0.1: (1 - a) p + a q = (0.45 + 0.025, 0.27 + 0.025, 0.18 + 0.05) = (0.475, 0.295, 0.23)
    # SRKL = 0.25 ln(0.25/0.475) + 0.25 ln(0.25/0.295) + 0.5 ln(0.5/0.23)
    #      = 0.25 * (-0.641854) + 0.25 * (-0.165514) + 0.5 * 0.776529 = 0.186422
    expected = 0.25 * math.log(0.25 / 0.475) + 0.25 * math.log(0.25 / 0.295) + 0.5 * math.log(0.5 / 0.23)
    assert expected == pytest.approx(0.186422, abs=1e-6)
    value = losses.logit_divergence(_one_row(Q_S), _one_row(P_T), 1.0, "srkl", skew=0.1)
    assert value.item() == pytest.approx(expected, rel=1e-9)


def test_skew_zero_is_plain_kl_and_temperature_squared_applies():
    s, t = _logits(n=8, v=11)
    for skew_kind, plain in (("skl", "forward"), ("srkl", "reverse")):
        for temp in (1.0, 2.0):
            assert losses.logit_divergence(s, t, temp, skew_kind, skew=0.0).item() == pytest.approx(
                losses.logit_divergence(s, t, temp, plain).item(), rel=1e-6)
    # At a = 1 the skew KL compares the teacher with itself.
    assert losses.logit_divergence(s, t, 1.0, "skl", skew=1.0).item() == pytest.approx(0.0, abs=1e-7)
    # T^2: at T = 2 the hand example's logits doubled give the same distributions, loss x 4.
    doubled = losses.logit_divergence(2 * _one_row(Q_S), 2 * _one_row(P_T), 2.0, "skl")
    assert doubled.item() == pytest.approx(4 * 0.176791, abs=1e-5)


def test_skew_divergence_gradients_match_finite_differences():
    gen = _gen(5)
    s = torch.randn(3, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    for kind in ("skl", "srkl", "jsd"):
        assert torch.autograd.gradcheck(lambda x, k=kind: losses.logit_divergence(x, t, 1.5, k, 0.3), (s,))


def test_divergence_names_and_bad_options_fail_in_one_line():
    s, t = _logits(n=2, v=5)
    for kind in losses.DIVERGENCES:
        assert torch.isfinite(losses.logit_divergence(s, t, 2.0, kind))
    with pytest.raises(ConfigError, match="unknown divergence 'kl'; choose one of forward, reverse"):
        losses.logit_divergence(s, t, 2.0, "kl")
    with pytest.raises(ConfigError, match=r"skew .* must be in \[0, 1\]"):
        losses.logit_divergence(s, t, 2.0, "skl", skew=1.5)
    with pytest.raises(ConfigError, match="temperature must be > 0"):
        losses.logit_divergence(s, t, 0.0)


# ---------------------------------------------------------------- ULD

def test_uld_hand_computed_across_vocabulary_sizes():
    student = torch.tensor([[math.log(0.2), math.log(0.5), math.log(0.3)]])  # V_s = 3
    teacher = torch.tensor([[math.log(0.1), math.log(0.6), math.log(0.25), math.log(0.05)]])  # V_t = 4
    # sorted: student (0.5, 0.3, 0.2, 0 [pad]), teacher (0.6, 0.25, 0.1, 0.05)
    # L1 = 0.1 + 0.05 + 0.1 + 0.05 = 0.3; a second row equal on both sides adds 0 -> mean 0.15.
    same = torch.tensor([[0.0, 0.0, 0.0]])
    two_s = torch.cat([student, same])
    two_t = torch.cat([teacher, torch.tensor([[0.0, 0.0, 0.0, -math.inf]])])
    assert losses.uld_loss(student, teacher).item() == pytest.approx(0.3, abs=1e-6)
    assert losses.uld_loss(two_s, two_t).item() == pytest.approx(0.15, abs=1e-6)
    assert losses.logit_divergence(two_s, two_t, 1.0, "uld").item() == pytest.approx(0.15, abs=1e-6)


def test_uld_is_zero_for_permuted_distributions_and_has_gradients():
    gen = _gen(6)
    t = torch.randn(4, 9, generator=gen)
    perm = torch.randperm(9, generator=gen)
    padded = torch.cat([t[:, perm], torch.full((4, 3), -math.inf)], dim=1)  # extra zero-mass ids
    assert losses.uld_loss(padded, t).item() == pytest.approx(0.0, abs=1e-6)
    s = torch.randn(4, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: losses.uld_loss(x, t.double(), 2.0), (s,))


# ---------------------------------------------------------------- top-k with a leftover bucket

def test_teacher_topk_and_topk_divergence_hand_computed():
    # Teacher probabilities at T = 1; k = 2 keeps ids (0, 1) of row 0 and (3, 4) of row 1.
    p = torch.tensor([[0.5, 0.2, 0.1, 0.1, 0.1], [0.05, 0.05, 0.1, 0.38, 0.42]])
    q = torch.tensor([[0.2, 0.2, 0.2, 0.2, 0.2], [0.1, 0.1, 0.2, 0.3, 0.3]])
    top = losses.teacher_topk(p.log(), 2, 1.0)
    assert top.ids.tolist() == [[0, 1], [4, 3]]
    torch.testing.assert_close(top.logprobs.exp(), torch.tensor([[0.5, 0.2], [0.42, 0.38]]))
    torch.testing.assert_close(top.rest_logprob.exp(), torch.tensor([0.3, 0.2]))
    # Buckets: row 0 teacher (0.5, 0.2 | 0.3), student (0.2, 0.2 | 0.6);
    #          row 1 teacher (0.42, 0.38 | 0.2), student (0.3, 0.3 | 0.4).
    row0 = 0.5 * math.log(0.5 / 0.2) + 0.2 * math.log(1.0) + 0.3 * math.log(0.3 / 0.6)
    row1 = 0.42 * math.log(0.42 / 0.3) + 0.38 * math.log(0.38 / 0.3) + 0.2 * math.log(0.2 / 0.4)
    forward = (row0 + row1) / 2  # = (0.250201 + 0.092517) / 2 = 0.171359
    assert forward == pytest.approx(0.171359, abs=1e-6)
    value = losses.topk_logit_divergence(q.log(), top.logprobs, top.ids, 1.0, "forward",
                                         teacher_rest_logprob=top.rest_logprob)
    assert value.item() == pytest.approx(forward, rel=1e-5)
    # Without the stored leftover, 1 - sum(top k) gives the same buckets here.
    derived = losses.topk_logit_divergence(q.log(), top.logprobs, top.ids, 1.0, "forward")
    assert derived.item() == pytest.approx(forward, rel=1e-5)
    # At T = 2 the logits 2 log p give the same distributions: same buckets, loss x T^2 = 4.
    top2 = losses.teacher_topk(2 * p.log(), 2, 2.0)
    torch.testing.assert_close(top2.logprobs, top.logprobs)
    value2 = losses.topk_logit_divergence(2 * q.log(), top2.logprobs, top2.ids, 2.0, "forward",
                                          teacher_rest_logprob=top2.rest_logprob)
    assert value2.item() == pytest.approx(4 * forward, rel=1e-5)


@pytest.mark.parametrize("kind", losses.SHARED_VOCAB_DIVERGENCES)
@pytest.mark.parametrize("stored_rest", [True, False])
def test_topk_with_k_equal_vocabulary_is_the_dense_loss(kind, stored_rest):
    s, t = _logits(n=16, v=30)
    s.requires_grad_()
    top = losses.teacher_topk(t, 30, 2.0)
    assert torch.isneginf(top.rest_logprob).all()
    rest = top.rest_logprob if stored_rest else None
    got = losses.topk_logit_divergence(s, top.logprobs, top.ids, 2.0, kind, 0.2, teacher_rest_logprob=rest)
    ref = losses.logit_divergence(s, t, 2.0, kind, 0.2)
    assert got.item() == pytest.approx(ref.item(), abs=1e-6)
    (g_got,) = torch.autograd.grad(got, s)
    (g_ref,) = torch.autograd.grad(ref, s)
    torch.testing.assert_close(g_got, g_ref, atol=1e-6, rtol=0)


def test_topk_from_a_bf16_store_needs_the_stored_leftover():
    # A peaked teacher (median leftover mass ~1e-3 outside its top 16 of 200): a store keeps the
    # log-probs in bf16. With the leftover stored (as a log), the loss stays within 0.1%; rebuilt
    # as 1 - sum(bf16 top k), the reverse KL is off by several percent (8% here).
    gen = _gen(11)
    t = 6 * torch.randn(32, 200, generator=gen)
    s = (t + 0.3 * torch.randn(32, 200, generator=gen)).requires_grad_()
    top = losses.teacher_topk(t, 16, 1.0)
    exact = losses.topk_logit_divergence(s, top.logprobs, top.ids, 1.0, "reverse",
                                         teacher_rest_logprob=top.rest_logprob)
    stored = losses.topk_logit_divergence(s, top.logprobs.bfloat16(), top.ids, 1.0, "reverse",
                                          teacher_rest_logprob=top.rest_logprob.bfloat16())
    rebuilt = losses.topk_logit_divergence(s, top.logprobs.bfloat16(), top.ids, 1.0, "reverse")
    assert stored.item() == pytest.approx(exact.item(), rel=1e-3)
    assert abs(rebuilt.item() / exact.item() - 1) > 0.03
    (grad,) = torch.autograd.grad(stored, s)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("kind", losses.SHARED_VOCAB_DIVERGENCES)
def test_topk_gradient_matches_finite_differences(kind):
    gen = _gen(8)
    s = torch.randn(3, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    top = losses.teacher_topk(torch.randn(3, 7, generator=gen, dtype=torch.float64), 3, 1.5)
    assert torch.autograd.gradcheck(
        lambda x: losses.topk_logit_divergence(x, top.logprobs, top.ids, 1.5, kind, 0.3,
                                               teacher_rest_logprob=top.rest_logprob), (s,))


def test_topk_bad_k_and_kind_fail_in_one_line():
    s, t = _logits(n=2, v=5)
    with pytest.raises(ConfigError, match="1 <= k <= vocabulary size 5"):
        losses.teacher_topk(t, 6, 1.0)
    top = losses.teacher_topk(t, 2, 1.0)
    with pytest.raises(ConfigError, match="unknown divergence 'uld'"):
        losses.topk_logit_divergence(s, top.logprobs, top.ids, 1.0, "uld")


# ---------------------------------------------------------------- chunked over positions

@pytest.mark.parametrize("kind", losses.SHARED_VOCAB_DIVERGENCES)
@pytest.mark.parametrize("with_heads", [False, True])
def test_chunked_equals_dense_values_and_gradients(kind, with_heads):
    gen = _gen(7)
    n, d, v = 37, 12, 50  # 37 rows in chunks of 8: the last chunk is partial
    h_s = torch.randn(n, d, generator=gen, requires_grad=True)
    h_t = torch.randn(n, d, generator=gen)
    w_s = (torch.randn(v, d, generator=gen) / 3).requires_grad_()
    w_t = torch.randn(v, d, generator=gen) / 3
    ref = losses.logit_divergence(h_s @ w_s.T, h_t @ w_t.T, 2.0, kind, 0.2)
    ref_grads = torch.autograd.grad(ref, (h_s, w_s))
    if with_heads:
        got = losses.chunked_logit_divergence(h_s, h_t, 2.0, kind, 0.2, student_head=w_s,
                                              teacher_head=w_t, chunk_rows=8)
    else:
        got = losses.chunked_logit_divergence(h_s @ w_s.T, h_t @ w_t.T, 2.0, kind, 0.2, chunk_rows=8)
    got_grads = torch.autograd.grad(got, (h_s, w_s))
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    for a, b in zip(ref_grads, got_grads, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


def test_chunked_reads_bf16_logits_as_their_fp32_values():
    s, t = _logits(n=20, v=40)
    s16, t16 = s.bfloat16().requires_grad_(), t.bfloat16()
    got = losses.chunked_logit_divergence(s16, t16, 2.0, "jsd", chunk_rows=6)
    ref = losses.logit_divergence(s16.float(), t16.float(), 2.0, "jsd")
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)
    got.backward()
    assert s16.grad.dtype == torch.bfloat16 and torch.isfinite(s16.grad.float()).all()
    with torch.no_grad():
        assert losses.chunked_logit_divergence(s16, t16, 2.0, "jsd", chunk_rows=6).item() == got.item()


def test_chunked_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same vocabulary"):
        losses.chunked_logit_divergence(torch.zeros(4, 3), torch.zeros(4, 6), student_head=torch.zeros(5, 3))
    with pytest.raises(ValueError, match="does not map its rows"):
        losses.chunked_logit_divergence(torch.zeros(4, 3), torch.zeros(4, 5), student_head=torch.zeros(5, 2))
