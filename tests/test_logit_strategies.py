"""The logit term of the strategies: divergence choices, skew, top-k and chunked logit KD.

Tiny random-init Llama pair shaped like pair=tiny_causal (teacher d 128, student d 32), with a
small vocabulary so every test takes well under a second.
"""

import dataclasses
import logging

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from flexkd import losses
from flexkd.errors import ConfigError
from flexkd.models import CausalLM
from flexkd.schema import choices
from flexkd.step import LiveTeacher, distill_terms
from flexkd.strategies import SetupContext, Strategy, build_strategy

VOCAB = 48
SHAPES = {"teacher": dict(hidden_size=128, num_hidden_layers=3, intermediate_size=256),
          "student": dict(hidden_size=32, num_hidden_layers=2, intermediate_size=64)}


def causal(role, seed, **config):
    torch.manual_seed(seed)
    cfg = AutoConfig.for_model("llama", vocab_size=VOCAB, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=32, tie_word_embeddings=True,
                               **SHAPES[role], **config)
    model = CausalLM(AutoModelForCausalLM.from_config(cfg).double())
    return model.eval().requires_grad_(False) if role == "teacher" else model


def causal_batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (3, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0
    labels = ids.clone()
    labels[:, :4] = -100  # the prompt
    labels[mask == 0] = -100
    side = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return {"student": side, "teacher": side, "index": torch.arange(3)}


class NoData:
    tokenizers = {}


def prepared(teacher=None, student=None, **knobs):
    teacher, student = teacher or causal("teacher", 0), student or causal("student", 1)
    strategy = build_strategy("logit_kd", **knobs)
    strategy.setup(SetupContext(teacher=teacher, student=student, datamodule=NoData()))
    return strategy, teacher, student


def logit_term_and_grads(strategy, teacher, student, b=None):
    student.zero_grad()
    terms = distill_terms(strategy, student, b or causal_batch(), LiveTeacher(teacher, strategy))
    terms["logit"].backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    return terms["logit"].detach(), grads


def assert_same(a, b, tol):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    torch.testing.assert_close(loss_a, loss_b, rtol=tol, atol=tol)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=tol, atol=tol, msg=name)


def outputs(strategy, teacher, student, b=None):
    b = b or causal_batch()
    return (LiveTeacher(teacher, strategy)(b), student(b["student"]))


# ----------------------------------------------------------------------------- divergence knobs

def test_the_divergence_choices_are_the_loss_functions_names():
    assert choices(Strategy.Knobs.model_fields["divergence"]) == losses.DIVERGENCES
    with pytest.raises(ConfigError, match=r"strategy.divergence='kl' is not a valid choice "
                       r"\(did you mean 'skl'\?\); choose one of: forward, reverse, jsd, skl, srkl, uld"):
        build_strategy("logit_kd", divergence="kl")
    with pytest.raises(ConfigError, match=r"strategy.skew=1.5 is out of range: it must be <= 1"):
        build_strategy("logit_kd", skew=1.5)


def test_skew_reaches_the_divergence_as_distillms_mixing_weight():
    """skl = KL(p || a p + (1-a) q), srkl = KL(q || (1-a) p + a q), by hand in fp64, times T^2."""
    strategy, teacher, student = prepared(divergence="skl", skew=0.3, temperature=1.5)
    t_out, s_out = outputs(strategy, teacher, student)
    p = torch.softmax(t_out.kd_logits / 1.5, -1)
    q = torch.softmax(s_out.kd_logits / 1.5, -1)
    skl = (p * (p / (0.3 * p + 0.7 * q)).log()).sum(-1).mean() * 1.5 ** 2
    srkl = (q * (q / (0.7 * p + 0.3 * q)).log()).sum(-1).mean() * 1.5 ** 2
    torch.testing.assert_close(strategy.logit_loss(t_out, s_out), skl, rtol=1e-12, atol=0)
    strategy.divergence = "srkl"
    torch.testing.assert_close(strategy.logit_loss(t_out, s_out), srkl, rtol=1e-12, atol=0)


@pytest.mark.parametrize("kind", losses.DIVERGENCES)
def test_every_divergence_runs_through_the_strategy_on_a_shared_vocabulary(kind):
    strategy, teacher, student = prepared(divergence=kind, gamma=0.5)
    t_out, s_out = outputs(strategy, teacher, student)
    expected = 0.5 * losses.logit_divergence(s_out.kd_logits, t_out.kd_logits, 2.0, kind, 0.1)
    terms = strategy.losses(causal_batch(), t_out, s_out)
    torch.testing.assert_close(terms["logit"], expected, rtol=1e-12, atol=0)
    assert expected > 0 and terms["logit"].requires_grad


def test_logit_knob_combinations_that_cannot_run_are_one_line_errors():
    with pytest.raises(ConfigError, match=r"strategy.logit_topk=8 and strategy.logit_chunk_rows=4: "
                       r"choose one"):
        build_strategy("logit_kd", logit_topk=8, logit_chunk_rows=4)
    with pytest.raises(ConfigError, match=r"strategy.logit_topk=8 needs a one-vocabulary divergence, "
                       r"but strategy.divergence='uld'; choose one of forward, reverse, jsd, skl, srkl"):
        build_strategy("logit_kd", logit_topk=8, divergence="uld")
    with pytest.raises(ConfigError, match=r"strategy.logit_chunk_rows=0 is out of range"):
        build_strategy("logit_kd", logit_chunk_rows=0)


# ----------------------------------------------------------------------------- top-k

def test_the_teacher_request_names_k_and_its_temperature():
    request = build_strategy("logit_kd", logit_topk=5, temperature=3.0).teacher_request()
    assert (request.logits, request.topk, request.topk_temperature) == (True, 5, 3.0)
    dense = build_strategy("logit_kd").teacher_request()
    assert (dense.logits, dense.topk, dense.topk_temperature) == (True, None, None)
    off = build_strategy("sft", logit_topk=5).teacher_request()  # gamma = 0: no logit term
    assert (off.logits, off.topk) == (False, None)


@pytest.mark.parametrize("kind", losses.SHARED_VOCAB_DIVERGENCES)
def test_topk_with_k_equal_to_the_vocabulary_is_the_dense_loss(kind):
    dense = logit_term_and_grads(*prepared(divergence=kind, skew=0.2))
    topk = logit_term_and_grads(*prepared(divergence=kind, skew=0.2, logit_topk=VOCAB))
    assert_same(topk, dense, 1e-10)


def test_k_above_the_vocabulary_is_rejected_at_setup():
    with pytest.raises(ConfigError, match=rf"strategy.logit_topk=49 exceeds the teacher's {VOCAB} "
                       r"outputs \(causal_lm\); use logit_topk <= 48, or null"):
        prepared(logit_topk=VOCAB + 1)


def test_a_precomputed_teacher_topk_equals_topk_from_live_logits():
    strategy, teacher, student = prepared(logit_topk=6, divergence="jsd", temperature=1.7)
    t_out, s_out = outputs(strategy, teacher, student)
    live = strategy.logit_loss(t_out, s_out)
    # What a teacher-output store hands back: the top-k fields only, no logits.
    stored = dataclasses.replace(t_out, kd_logits=None, logits=None,
                                 kd_topk=losses.teacher_topk(t_out.kd_logits, 6, 1.7))
    assert torch.equal(strategy.logit_loss(stored, s_out), live)
    # And the top-k term differs from the dense one (k = 6 of 48 drops real mass).
    dense = losses.logit_divergence(s_out.kd_logits, t_out.kd_logits, 1.7, "jsd")
    assert not torch.allclose(live, dense, rtol=1e-3)
    wrong_k = dataclasses.replace(stored, kd_topk=losses.teacher_topk(t_out.kd_logits, 4, 1.7))
    with pytest.raises(ValueError, match=r"precomputed top-k has k=4, the strategy asks for k=6"):
        strategy.logit_loss(wrong_k, s_out)


# ----------------------------------------------------------------------------- chunked

@pytest.mark.parametrize("kind", ["forward", "srkl"])
def test_chunked_logit_kd_from_the_lm_heads_equals_dense(kind):
    dense = logit_term_and_grads(*prepared(divergence=kind))
    strategy, teacher, student = prepared(divergence=kind, logit_chunk_rows=4)
    assert strategy.chunk_from_heads
    chunked = logit_term_and_grads(strategy, teacher, student)
    assert_same(chunked, dense, 1e-5)
    # The heads path needs no logits at all: the same value from hidden rows and head weights.
    t_out, s_out = outputs(strategy, teacher, student)
    no_logits = [dataclasses.replace(o, kd_logits=None, logits=None) for o in (t_out, s_out)]
    torch.testing.assert_close(strategy.logit_loss(*no_logits), dense[0], rtol=1e-10, atol=0)
    assert teacher.backbone.get_output_embeddings().weight.grad is None


def test_a_head_that_is_not_a_plain_matmul_falls_back_to_chunked_logits(caplog):
    student = causal("student", 1)
    head = student.backbone.get_output_embeddings()
    head.bias = torch.nn.Parameter(torch.linspace(-1, 1, VOCAB, dtype=torch.float64))
    dense = logit_term_and_grads(*prepared(student=student))
    with caplog.at_level(logging.WARNING):
        strategy, teacher, student = prepared(student=student, logit_chunk_rows=5)
    assert not strategy.chunk_from_heads
    assert "chunking the logits, not the LM head's input, because the student has an LM head " \
           "with a bias" in caplog.text
    assert_same(logit_term_and_grads(strategy, teacher, student), dense, 1e-10)


def test_linear_head_problem_reads_soft_capping_and_checks_the_logits():
    assert causal("teacher", 0).linear_head_problem() is None
    capped = causal("teacher", 0, final_logit_softcapping=30.0)
    assert capped.linear_head_problem() == "transforms its logits (config.final_logit_softcapping=30.0)"
    # A head whose output is not the matmul (here a shift added by a hook) is caught by the check.
    shifted = causal("student", 1)
    shifted.backbone.lm_head.register_forward_hook(lambda module, args, out: out + 0.5)
    assert shifted.linear_head_problem() == ("gives logits that differ from its last hidden state "
                                             "times the head weight")
