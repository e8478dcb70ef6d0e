"""The teacher-output store answers like the live teacher (up to bf16 rounding), is reused
across runs, and is rebuilt when damaged.

Tolerances. The store keeps the teacher's outputs in bf16, so a stored value is the live fp32
value rounded to 8 significant bits: at most one bf16 ulp away (2^-7 relative; the build runs
other batch shapes than training, so a value sitting on a rounding boundary may round the other
way). Two checks follow: (1) the stored values equal the live ones within one bf16 ulp, and the
loss terms and student gradients computed from the store equal those computed from the live
outputs *rounded to bf16* to fp32 precision (rtol 1e-4): the store changes nothing but the
rounding; (2) against the unrounded live teacher, terms and gradients agree within rtol 2e-2
(a relative input error of 2^-9 moves these smooth losses by a few times that).

A causal LM's top-k store keeps log-probabilities, whose bf16 error is 2^-8 |log p| absolute,
i.e. that relative error in each probability (~2% for the tiny near-uniform teacher, log p ~
-4.9). Check (1) is the same; for (2) the KD-logit gradient is held to an exact elementwise
bound derived from that error (`topk_rounding_bound`), see `assert_topk_store_matches_live`.
A whole-vocabulary store keeps log-softmax rows in bf16: checks (1) and (2) as for hidden
states, (1) against the live log-probs rounded to bf16 (`rounded_log_probs`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from flexkd import losses
from flexkd import teacher_store as teacher_store_module
from flexkd.data.datamodule import DistillDataModule
from flexkd.data.tasks import TaskSpec
from flexkd.models import IGNORE_INDEX, build_model, uses_label_words
from flexkd.sources import resolve_source
from flexkd.step import LiveTeacher, distill_terms
from flexkd.strategies import SetupContext, build_strategy
from flexkd.teacher_store import (
    STORE_KIND,
    StoredTeacher,
    StoreMismatchError,
    store_decision,
    teacher_store,
)

ROOT = Path(__file__).resolve().parents[1]

BF16_ULP = 2.0**-7


def config(pair: str, task: str = "tiny_cls", strategy: str = "sft"):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        # 96 training examples and a 64-example probe keep each case a few seconds.
        return compose("config", overrides=[f"pair={pair}", f"task={task}", f"strategy={strategy}",
                                            "task.max_train_examples=96"])


def prepared(name: str, pair: str, cache_dir, task: str = "tiny_cls", **knobs):
    """Teacher, student, strategy (set up) and data of a tiny pair on `task`."""
    cfg = config(pair, task=task, strategy=name)
    resolve = lambda s: resolve_source(s, cache_dir)  # noqa: E731
    task = TaskSpec.from_config(cfg.task, resolve)
    from flexkd.models import load_tokenizer

    tok = load_tokenizer(OmegaConf.to_container(cfg.pair.student, resolve=True), resolve)
    label_words = uses_label_words(cfg.pair)
    spec = lambda side: OmegaConf.to_container(cfg.pair[side], resolve=True)  # noqa: E731
    teacher = build_model(spec("teacher"), task.format, tok, task.label_names, resolve,
                          label_words=label_words).eval().requires_grad_(False)
    student = build_model(spec("student"), task.format, tok, task.label_names, resolve, seed=1,
                          label_words=label_words)
    # Dropout off in the student too: the two passes compared below must be the same function.
    student.eval()
    # Not length-bucketed: the batches must have padding for the shape rebuild to be tested.
    data = DistillDataModule(task, tok, batch_size=8, seed=0, label_words=label_words,
                             bucket_by_length=False)
    data.setup()
    if name == "flexkd":
        knobs = {"probe_examples": 64} | knobs
    strategy = build_strategy(OmegaConf.to_container(cfg.strategy, resolve=True), **knobs)
    strategy.setup(SetupContext(teacher=teacher, student=student, datamodule=data,
                                cache_dir=str(cache_dir), teacher_fingerprint=f"test-{pair}"))
    return cfg, teacher, student, strategy, data


def build(cfg, teacher, strategy, data, cache_dir, setting="auto"):
    return teacher_store(setting, strategy, teacher, data, cache_dir=cache_dir,
                         teacher_fingerprint=f"test-{cfg.pair.name}",
                         trainer_cfg={"precision": "32-true"}, device=torch.device("cpu"),
                         precision=contextlib.nullcontext(), batch_size=16)


class RoundedLive:
    """The live teacher with every output rounded to bf16, as the store keeps them. With
    `topk=(k, T)` (a causal top-k store) its logits become `losses.teacher_topk` with the
    log-probs rounded to bf16 (ids and the fp32 leftover as they are)."""

    def __init__(self, live, topk: tuple[int, float] | None = None):
        self.live, self.topk = live, topk

    def __call__(self, batch):
        out = self.live(batch)
        r = lambda t: None if t is None else t.to(torch.bfloat16).to(t.dtype)  # noqa: E731
        hidden = {k: r(v) for k, v in out.hidden.items()}
        if self.topk is not None:
            top = losses.teacher_topk(out.kd_logits, *self.topk)
            return dataclasses.replace(out, kd_logits=None, logits=None, hidden=hidden,
                                       kd_topk=top._replace(logprobs=r(top.logprobs)))
        return dataclasses.replace(out, kd_logits=r(out.kd_logits), logits=r(out.logits),
                                   hidden=hidden)


def terms_and_grads(strategy, student, batch, teacher_outputs):
    student, strategy = copy.deepcopy(student), copy.deepcopy(strategy)
    terms = distill_terms(strategy, student, batch, teacher_outputs)
    sum(terms.values()).backward()
    grads = {n: p.grad for n, p in student.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in terms.items()}, grads


def rounded_log_probs(live):
    """The live causal teacher with its KD logits turned into log-probs rounded to bf16, as a
    whole-vocabulary store keeps them."""
    def answer(batch):
        out = live(batch)
        z = out.kd_logits
        return dataclasses.replace(out, kd_logits=torch.log_softmax(z.float(), -1).to(
            torch.bfloat16).to(z.dtype))
    return answer


def assert_losses_match_live(strategy, student, teacher, batch, stored, rounding=RoundedLive):
    """Terms and student gradients from the store equal those from the live teacher rounded as
    the store rounds it (`rounding`; rtol 1e-4), and those from the unrounded live teacher within
    rtol 2e-2."""
    live = LiveTeacher(teacher, strategy)
    s_terms, s_grads = terms_and_grads(strategy, student, batch, stored)
    r_terms, r_grads = terms_and_grads(strategy, student, batch, rounding(live))
    l_terms, l_grads = terms_and_grads(strategy, student, batch, live)
    assert s_terms.keys() == l_terms.keys() and len(s_terms) >= 2  # task + a teacher term
    for k in l_terms:
        torch.testing.assert_close(s_terms[k], r_terms[k], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(s_terms[k], l_terms[k], rtol=2e-2, atol=1e-4)
    assert s_grads.keys() == l_grads.keys()
    for k in l_grads:
        scale = l_grads[k].abs().max().item()
        torch.testing.assert_close(s_grads[k], r_grads[k], rtol=1e-4, atol=1e-4 * scale + 1e-7)
        torch.testing.assert_close(s_grads[k], l_grads[k], rtol=2e-2, atol=2e-2 * scale + 1e-7)


def logit_term_and_grads(strategy, student, batch, teacher_outputs):
    """The logit term, the student's parameter gradients from it alone (the task term is the
    same whoever answers for the teacher, and would only dilute a difference), and its
    gradient w.r.t. the student's KD logits."""
    student, strategy = copy.deepcopy(student), copy.deepcopy(strategy)
    kd = {}
    student.register_forward_hook(lambda module, args, out: kd.update(z=out.kd_logits))
    term = distill_terms(strategy, student, batch, teacher_outputs)["logit"]
    kd["z"].retain_grad()
    term.backward()
    grads = {n: p.grad for n, p in student.named_parameters() if p.grad is not None}
    return term.detach(), grads, kd["z"].grad, kd["z"].detach()


def topk_rounding_bound(strategy, kd_logits, top) -> torch.Tensor:
    """How far the forward-KL logit term's gradient w.r.t. the student's KD logits z can move when
    each stored teacher log-prob is off by up to one bf16 ulp, elementwise.

    The gradient is gamma * T / N * (q - p^), q the student's softmax at T and p^ the teacher's
    target per id (its top-k probabilities; on the other ids its leftover mass shared as q
    shares it). Errors of at most d = 2^-7 * max|log p| (one ulp of the row's largest log-prob:
    half an ulp for rounding, the other half for a value that the build's batch shape moves
    across a rounding boundary), renormalised over the k + 1 buckets, scale each p^ by a factor
    in [e^-2d, e^2d], so |delta p^| <= p^ (e^2d - 1). An exact bound, not a first-order one."""
    t, n = strategy.temperature, kd_logits.shape[0]
    log_q = torch.log_softmax(kd_logits.double() / t, dim=-1)
    logprobs, ids = top.logprobs.double(), top.ids
    # Other ids: q_v * (the teacher's leftover / the student's leftover); top-k ids: p_c.
    rest_q = log_q.scatter(-1, ids, -torch.inf).logsumexp(dim=-1, keepdim=True)
    target = (log_q + top.rest_logprob.double()[:, None] - rest_q).exp().nan_to_num(0.0)
    target = target.scatter(-1, ids, logprobs.exp())
    d = BF16_ULP * logprobs.abs().amax(dim=-1, keepdim=True)
    return strategy.gamma * t / n * target * torch.expm1(2 * d)


def assert_topk_store_matches_live(strategy, student, teacher, batch, stored, reference=None):
    """The store's logit term against the live teacher's top-k path (`reference`: the live
    strategy to compare with; default `strategy` itself, whose live top-k is computed from the
    live logits by `teacher_topk_of`).

    (1) Against the live top-k with its log-probs rounded to bf16, as the store keeps them: the
        term, the parameter gradients and the KD-logit gradient agree to fp32 precision (rtol
        1e-4): the store changes nothing but that rounding.
    (2) Against the unrounded reference: the KD-logit gradient stays within
        `topk_rounding_bound` of it, elementwise (the parameter gradients are the same
        backward map of that gradient, checked exactly in (1)); the term within rtol 2e-2, the
        relative error one rounded probability may carry (2^-8 |log p| <= 2.2% here, where the
        tiny random teacher is near-uniform: log p ~ -log 140 = -4.9; independent roundings
        largely cancel, 0.8% was the worst seen)."""
    reference = reference or strategy
    live = LiveTeacher(teacher, strategy)
    rounded = RoundedLive(live, (strategy.logit_topk, strategy.temperature))
    s_term, s_grads, s_kd, z = logit_term_and_grads(strategy, student, batch, stored)
    r_term, r_grads, r_kd, _ = logit_term_and_grads(strategy, student, batch, rounded)
    torch.testing.assert_close(s_term, r_term, rtol=1e-4, atol=1e-7)
    assert s_grads.keys() == r_grads.keys() and s_grads
    for k in r_grads:
        scale = r_grads[k].abs().max().item()
        torch.testing.assert_close(s_grads[k], r_grads[k], rtol=1e-4, atol=1e-4 * scale + 1e-9)
    torch.testing.assert_close(s_kd, r_kd, rtol=1e-4, atol=1e-4 * r_kd.abs().max().item())

    l_term, _, l_kd, _ = logit_term_and_grads(reference, student, batch, LiveTeacher(teacher, reference))
    torch.testing.assert_close(s_term, l_term, rtol=2e-2, atol=1e-7)
    top = losses.teacher_topk(live(batch).kd_logits, strategy.logit_topk, strategy.temperature)
    bound = topk_rounding_bound(strategy, z, top)
    excess = (s_kd - l_kd).abs().double() - bound
    assert excess.max() <= 1e-6 * l_kd.abs().max().item(), float(excess.max())
    # Not vacuous: about a fifth of the gradient's scale here. The tiny teacher is near-uniform
    # (|log p| ~ 5, so one ulp is ~4% of each probability) and the student differs by ~10%.
    assert bound.max() < 0.5 * l_kd.abs().max()


CASES = [("flexkd", "tiny_encoder", {}), ("flexkd", "tiny_encoder", {"selection": "directions"}),
         ("raw", "tiny_encoder_same", {}), ("projection", "tiny_encoder", {}),
         ("cka", "tiny_encoder", {}), ("logit_kd", "tiny_encoder", {}),
         ("flexkd", "tiny_causal", {}), ("cka", "tiny_causal", {})]


@pytest.mark.parametrize("name,pair,knobs", CASES, ids=[f"{n}-{p}-{'-'.join(k)}" for n, p, k in CASES])
def test_store_answers_like_the_live_teacher(name, pair, knobs, tmp_path):
    cfg, teacher, student, strategy, data = prepared(name, pair, tmp_path, **knobs)
    handle = build(cfg, teacher, strategy, data, tmp_path)
    assert handle.info["enabled"] and not handle.info["cache_hit"], handle.info
    stored, live = handle.outputs, LiveTeacher(teacher, strategy)
    classifier = teacher.kind == "classifier"
    assert stored.examples == len(data.splits["train"])

    checked = 0
    for i, batch in enumerate(data.train_dataloader()):  # shuffled: index -> rows mapping
        if i == 3:
            break
        mask = batch["teacher"]["attention_mask"].bool()
        assert not mask.all(), "the batch should have padding"
        s_out, l_out = stored(batch), live(batch)
        # Full states, as the live teacher gives them: the strategy reduces both alike.
        assert s_out.hidden.keys() == l_out.hidden.keys() and not s_out.reduced
        for layer in l_out.hidden:
            s, lv = s_out.hidden[layer], l_out.hidden[layer]
            assert s.shape == lv.shape and s.dtype == lv.dtype
            assert s.shape[-1] == teacher.hidden_size
            torch.testing.assert_close(s[mask], lv[mask], rtol=BF16_ULP, atol=1e-6)
            assert (s[~mask] == 0).all()
        if classifier:  # class logits are stored whatever the strategy asks
            torch.testing.assert_close(s_out.kd_logits, l_out.kd_logits, rtol=BF16_ULP, atol=1e-6)
        assert_losses_match_live(strategy, student, teacher, batch, stored)
        checked += 1
    assert checked == 3


def test_flexkd_store_keeps_the_full_states_and_the_class_logits(tmp_path):
    cfg, teacher, _, strategy, data = prepared("flexkd", "tiny_encoder", tmp_path)
    assert strategy.teacher_request().logits is False  # flexkd (gamma 0) asks for no logits
    handle = build(cfg, teacher, strategy, data, tmp_path)
    stored = handle.outputs
    (layer, (flat, _)), = stored.hidden.items()
    # All d_T = 128 dims, not flexkd's k = 32: other selections read the same entry.
    assert layer == 3 and flat.shape == (stored.meta["tokens"], 128)
    assert strategy.k_effective == 32 < teacher.hidden_size == 128
    logits, _ = stored.logits
    assert logits.shape == (len(data.splits["train"]), teacher.num_outputs)
    assert stored.meta["request"] == {"layers": [3], "logits": True, "views": []}
    # bf16: 2 bytes per value; one row per valid token, one logit row per example.
    entry = Path(handle.info["path"])
    assert (entry / "hidden_3.bin").stat().st_size == stored.meta["tokens"] * 128 * 2
    assert (entry / "logits.bin").stat().st_size == 96 * teacher.num_outputs * 2


def test_one_entry_serves_flexkd_scores_projection_and_logit_kd(tmp_path):
    """flexkd(score=grad), flexkd(score=random), projection and logit_kd on one teacher, task
    and layer: one store entry, built once; each reads it and gets the live teacher's losses."""
    runs = [prepared("flexkd", "tiny_encoder", tmp_path, score="grad"),
            prepared("flexkd", "tiny_encoder", tmp_path, score="random"),
            prepared("projection", "tiny_encoder", tmp_path),
            prepared("logit_kd", "tiny_encoder", tmp_path)]
    grad_sel, random_sel = runs[0][3].selection_0, runs[1][3].selection_0
    assert not torch.equal(grad_sel, random_sel)  # two selections: two entries under a view key
    assert runs[3][3].teacher_request().layers == ()  # logit_kd asks for logits only

    handles = [build(cfg, teacher, strategy, data, tmp_path)
               for cfg, teacher, _, strategy, data in runs]
    assert [h.info["cache_hit"] for h in handles] == [False, True, True, True]
    assert len({h.info["path"] for h in handles}) == 1
    entries = [p for p in (tmp_path / STORE_KIND).iterdir() if p.is_dir()]
    assert len(entries) == 1, entries
    assert [sorted(h.outputs.hidden) for h in handles] == [[3], [3], [3], []]

    for (_, teacher, student, strategy, data), handle in zip(runs, handles, strict=True):
        batch = next(iter(data.train_dataloader()))
        assert_losses_match_live(strategy, student, teacher, batch, handle.outputs)
    # logit_kd's KD term reads the entry's class logits (its task term needs no teacher).
    batch = next(iter(runs[3][4].train_dataloader()))
    live = LiveTeacher(runs[3][1], runs[3][3])(batch).kd_logits
    torch.testing.assert_close(handles[3].outputs(batch).kd_logits, live, rtol=BF16_ULP, atol=1e-6)


def test_auto_is_off_without_teacher_terms(tmp_path):
    cfg, teacher, _, sft, data = prepared("sft", "tiny_encoder", tmp_path)
    assert store_decision("auto", sft, teacher) == (False, "strategy 'sft' needs no teacher outputs")
    handle = build(cfg, teacher, sft, data, tmp_path)
    assert handle.outputs is None and not handle.info["enabled"]
    _, teacher, _, flex, _ = prepared("flexkd", "tiny_encoder", tmp_path)
    assert store_decision("off", flex, teacher) == (False, "teacher_store=off")
    assert store_decision("auto", flex, teacher)[0]


# ----------------------------------------------------------------------------- causal top-k

TOPK = 8


def causal_kd(tmp_path, **knobs):
    """logit_kd on the tiny causal pair and the tiny instruction task (several response tokens
    per example, so several KD rows each)."""
    return prepared("logit_kd", "tiny_causal", tmp_path, task="tiny_instruct", **knobs)


def response_tokens(data) -> int:
    """The train split's response tokens, counted from the labels: one KD row each."""
    return sum(sum(1 for label in e["teacher"].labels if label != IGNORE_INDEX)
               for e in data.splits["train"])


def test_causal_logit_kd_is_stored_unless_chunked_or_too_big(tmp_path, monkeypatch):
    cfg, teacher, _, dense, data = causal_kd(tmp_path)
    assert dense.teacher_request().logits and dense.logit_topk is None
    handle = build(cfg, teacher, dense, data, tmp_path)
    assert handle.info["enabled"] and isinstance(handle.outputs, StoredTeacher), handle.info
    assert handle.info["reason"] == "the teacher is frozen and deterministic (eval mode, fixed inputs)"
    cfg, teacher, _, chunked, data = causal_kd(tmp_path, logit_chunk_rows=4)
    handle = build(cfg, teacher, chunked, data, tmp_path)
    assert handle.outputs is None and handle.info["reason"].startswith(
        "chunked logit KD (strategy.logit_chunk_rows) reads the live teacher")
    # Whole-vocabulary rows over the size limit read the live teacher; a top-k is still stored.
    monkeypatch.setattr(teacher_store_module, "DENSE_MAX_GIB", 1e-6)
    handle = build(cfg, teacher, dense, data, tmp_path)
    gib = response_tokens(data) * teacher.num_outputs * 2 / 2**30
    assert handle.outputs is None and handle.info == {"enabled": False, "reason": (
        f"the teacher's whole-vocabulary rows for {response_tokens(data)} response tokens would "
        f"take {gib:.1f} GiB, over the store's 1e-06 GiB for them, so logit KD reads the live "
        "teacher; set strategy.logit_topk=K (e.g. 128) to store its top-k instead")}
    cfg, teacher, _, topk, data = causal_kd(tmp_path, logit_topk=TOPK)
    assert build(cfg, teacher, topk, data, tmp_path).info["enabled"]


def test_causal_dense_store_answers_with_the_live_log_probs(tmp_path):
    cfg, teacher, student, strategy, data = causal_kd(tmp_path)
    handle = build(cfg, teacher, strategy, data, tmp_path)
    assert handle.info["enabled"] and not handle.info["cache_hit"], handle.info
    stored, live = handle.outputs, LiveTeacher(teacher, strategy)
    rows, n, vocab = response_tokens(data), len(data.splits["train"]), teacher.num_outputs
    assert stored.meta["dense"]["rows"] == rows and stored.meta["dense"]["vocab"] == vocab
    assert stored.meta["request"] == {"layers": [], "logits": True, "views": []}
    sizes = {p.name: p.stat().st_size for p in Path(handle.info["path"]).iterdir()}
    assert sizes["kd_logprobs.bin"] == rows * vocab * 2 and sizes["kd_offsets.bin"] == (n + 1) * 8
    assert not any(name.startswith(("hidden_", "logits", "topk_")) for name in sizes)

    for i, batch in enumerate(data.train_dataloader()):  # shuffled: index -> rows mapping
        if i == 2:
            break
        assert not batch["teacher"]["attention_mask"].bool().all(), "the batch should have padding"
        s_out, l_out = stored(batch), live(batch)
        assert s_out.kd_topk is None and s_out.hidden == {}
        got = s_out.kd_logits
        assert got.shape == l_out.kd_logits.shape and got.dtype == l_out.kd_logits.dtype
        want = torch.log_softmax(l_out.kd_logits.float(), -1)
        torch.testing.assert_close(s_out.kd_logits, want, rtol=BF16_ULP, atol=0)
        assert_losses_match_live(strategy, student, teacher, batch, stored, rounding=rounded_log_probs)


def test_causal_topk_store_answers_like_the_live_topk(tmp_path):
    cfg, teacher, student, strategy, data = causal_kd(tmp_path, logit_topk=TOPK)
    temperature = strategy.temperature
    handle = build(cfg, teacher, strategy, data, tmp_path)
    assert handle.info["enabled"] and not handle.info["cache_hit"], handle.info
    stored, live = handle.outputs, LiveTeacher(teacher, strategy)
    rows, n = response_tokens(data), len(data.splits["train"])
    assert n == 96 and rows > 2 * n
    assert stored.meta["topk"]["rows"] == rows and stored.meta["topk"]["k"] == TOPK
    assert stored.meta["request"] == {"layers": [], "logits": True, "views": [], "topk": TOPK,
                                      "topk_temperature": temperature}
    # Per KD row: k bf16 log-probs, k int32 ids and one fp32 leftover = 8*2 + 8*4 + 4 = 52 bytes.
    sizes = {p.name: p.stat().st_size for p in Path(handle.info["path"]).iterdir()}
    assert sizes["topk_logprobs.bin"] == rows * TOPK * 2
    assert sizes["topk_ids.bin"] == rows * TOPK * 4
    assert sizes["topk_rest.bin"] == rows * 4
    assert sizes["kd_offsets.bin"] == (n + 1) * 8
    assert not any(name.startswith(("hidden_", "logits")) for name in sizes)

    for i, batch in enumerate(data.train_dataloader()):  # shuffled: index -> rows mapping
        if i == 2:
            break
        assert not batch["teacher"]["attention_mask"].bool().all(), "the batch should have padding"
        s_out, l_out = stored(batch), live(batch)
        assert s_out.kd_logits is None and s_out.logits is None and s_out.hidden == {}
        got, want = s_out.kd_topk, losses.teacher_topk(l_out.kd_logits, TOPK, temperature)
        assert got.logprobs.dtype == torch.float32 and got.ids.dtype == torch.int64
        assert torch.equal(got.ids, want.ids)
        torch.testing.assert_close(got.logprobs, want.logprobs, rtol=BF16_ULP, atol=0)
        torch.testing.assert_close(got.rest_logprob, want.rest_logprob, rtol=1e-5, atol=1e-6)
        assert_topk_store_matches_live(strategy, student, teacher, batch, stored)


def test_causal_topk_of_the_whole_vocabulary_is_the_dense_loss(tmp_path):
    cfg, teacher, student, dense, data = causal_kd(tmp_path)
    vocab = teacher.num_outputs
    full = causal_kd(tmp_path, logit_topk=vocab)[3]
    stored = build(cfg, teacher, full, data, tmp_path).outputs
    batch = next(iter(data.train_dataloader()))
    assert (stored(batch).kd_topk.rest_logprob == -torch.inf).all()  # no mass outside the top V
    # The live top-V path is the dense one to fp32 precision (k = V drops the leftover bucket)...
    v_term, v_grads, _, _ = logit_term_and_grads(full, student, batch, LiveTeacher(teacher, full))
    d_term, d_grads, _, _ = logit_term_and_grads(dense, student, batch, LiveTeacher(teacher, dense))
    torch.testing.assert_close(v_term, d_term, rtol=1e-5, atol=1e-8)
    assert v_grads.keys() == d_grads.keys() and d_grads
    for k in d_grads:
        scale = d_grads[k].abs().max().item()
        torch.testing.assert_close(v_grads[k], d_grads[k], rtol=1e-4, atol=1e-4 * scale)
    # ...and the store's top V equals the dense live loss up to the bf16 rounding of its log-probs.
    assert_topk_store_matches_live(full, student, teacher, batch, stored, reference=dense)


def test_a_topk_entry_serves_only_its_k_and_temperature(tmp_path):
    runs = [causal_kd(tmp_path, logit_topk=TOPK), causal_kd(tmp_path, logit_topk=4),
            causal_kd(tmp_path, logit_topk=TOPK, temperature=1.0), causal_kd(tmp_path, logit_topk=TOPK)]
    handles = [build(cfg, teacher, strategy, data, tmp_path) for cfg, teacher, _, strategy, data in runs]
    assert [h.info["cache_hit"] for h in handles] == [False, False, False, True]
    assert len({h.info["path"] for h in handles}) == 3
    assert [(h.outputs.meta["topk"]["k"], h.outputs.meta["topk"]["temperature"]) for h in handles] == [
        (8, 2.0), (4, 2.0), (8, 1.0), (8, 2.0)]

    # A batch whose response differs by one token from the store's is refused.
    batch = next(iter(runs[0][4].train_dataloader()))
    labels = batch["teacher"]["labels"].clone()
    last = int((labels[0] != IGNORE_INDEX).nonzero().max())
    labels[0, last] = IGNORE_INDEX
    batch["teacher"] = dict(batch["teacher"], labels=labels)
    with pytest.raises(StoreMismatchError, match="KD-row"):
        handles[0].outputs(batch)


def test_swapped_responses_are_another_entry(tmp_path):
    """seqkd trains on the teacher's own answers: the KD rows are those of the new responses."""
    cfg, teacher, _, strategy, data = causal_kd(tmp_path, logit_topk=TOPK)
    first = build(cfg, teacher, strategy, data, tmp_path)
    data.replace_responses("train", {e["index"]: "red blue" for e in data.splits["train"]})
    second = build(cfg, teacher, strategy, data, tmp_path)
    assert not second.info["cache_hit"] and second.info["path"] != first.info["path"]
    assert second.outputs.meta["topk"]["rows"] == response_tokens(data) != first.outputs.meta["topk"]["rows"]


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_store_is_detected_and_rebuilt(damage, tmp_path, caplog):
    cfg, teacher, _, strategy, data = prepared("flexkd", "tiny_encoder", tmp_path)
    first = build(cfg, teacher, strategy, data, tmp_path)
    again = build(cfg, teacher, strategy, data, tmp_path)
    assert again.info["cache_hit"] and again.info["path"] == first.info["path"]
    batch = next(iter(data.train_dataloader()))
    expected = first.outputs(batch)

    file = next(p for p in (tmp_path / STORE_KIND).rglob("hidden_*.bin"))
    raw = bytearray(file.read_bytes())
    if damage == "flip":
        raw[10:20] = bytes(b ^ 0xFF for b in raw[10:20])  # same size: only the sha256 can tell
    else:
        raw = raw[:-2]
    file.chmod(0o644)
    file.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING, logger="flexkd.cache"):
        rebuilt = build(cfg, teacher, strategy, data, tmp_path)
    assert not rebuilt.info["cache_hit"] and "damaged" in caplog.text
    got = rebuilt.outputs(batch)
    assert all(torch.equal(got.hidden[k], expected.hidden[k]) for k in expected.hidden)


def test_store_refuses_a_batch_from_other_data(tmp_path):
    cfg, teacher, _, strategy, data = prepared("cka", "tiny_encoder", tmp_path)
    stored = build(cfg, teacher, strategy, data, tmp_path).outputs
    batch = next(iter(data.train_dataloader()))
    batch["teacher"] = dict(batch["teacher"], attention_mask=batch["teacher"]["attention_mask"].clone())
    batch["teacher"]["attention_mask"][0, 0] = 0  # one token fewer than the store holds
    with pytest.raises(RuntimeError, match="token counts differ"):
        stored(batch)
    assert isinstance(stored, StoredTeacher)


def test_run_builds_the_store_once_and_another_seed_reads_it(run_cli):
    args = ("pair=tiny_encoder", "task=tiny_cls", "strategy=flexkd", "teacher_store=auto",
            # A teacher layer no other test stores (the key ignores k, score and strategy),
            # so the first run must build the entry.
            "strategy.layer_pairs=[[-1,1]]")
    first = run_cli(*args, "seed=0", name="s0").results()["teacher_store"]
    second = run_cli(*args, "seed=1", name="s1").results()["teacher_store"]
    assert first["enabled"] and not first["cache_hit"] and first["size_mb"] > 0
    assert second["enabled"] and second["cache_hit"] and second["path"] == first["path"]
    sft = run_cli("pair=tiny_encoder", "task=tiny_cls", "strategy=sft", name="sft").results()
    assert sft["teacher_store"] == {"enabled": False,
                                    "reason": "strategy 'sft' needs no teacher outputs"}
