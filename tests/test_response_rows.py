"""A causal LM's head runs on the response rows only, and gives what the full logits gave.

Tiny random-init Llama in float64, so "the same" means equal to rounding."""

import logging

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from flexkd.evaluation.harness_metrics import label_word_predictions
from flexkd.models import CausalLM, response_positions

VOCAB = 40


def tiny_lm(seed=0) -> CausalLM:
    torch.manual_seed(seed)
    cfg = AutoConfig.for_model("llama", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                               intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=32, tie_word_embeddings=True)
    return CausalLM(AutoModelForCausalLM.from_config(cfg).double())


def batch():
    """Three rows of different prompt and response lengths; the last is right-padded."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (3, 10), generator=gen)
    mask = torch.ones_like(ids)
    mask[2, 7:] = 0
    labels = ids.clone()
    for row, prompt in enumerate((4, 6, 3)):
        labels[row, :prompt] = -100
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def loss_and_grads(model, inputs, **kw):
    model.zero_grad()
    out = model(inputs, **kw)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters()}


def test_response_rows_are_the_full_logits_at_those_rows_with_the_same_loss_and_gradients():
    model, inputs = tiny_lm(), batch()
    rows, rows_grads = loss_and_grads(model, inputs)
    full, full_grads = loss_and_grads(model, inputs, all_logits=True)
    assert rows.logits is None and full.logits.shape == (3, 10, VOCAB)
    positions = response_positions(inputs["labels"])
    assert rows.kd_logits.shape == (int(positions.sum()), VOCAB) == (6 + 4 + 4, VOCAB)
    torch.testing.assert_close(rows.kd_logits, full.logits[positions], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rows.kd_logits, full.kd_logits, rtol=1e-12, atol=1e-12)
    # The loss by hand: cross-entropy of the full logits at the response positions.
    targets = inputs["labels"][:, 1:][positions[:, :-1]]
    by_hand = -torch.log_softmax(full.logits[positions], -1).gather(1, targets[:, None]).mean()
    # (the loss is taken in float32, whatever the model's dtype)
    torch.testing.assert_close(rows.loss.double(), by_hand, rtol=1e-6, atol=0)
    torch.testing.assert_close(rows.loss, full.loss, rtol=0, atol=0)
    assert rows_grads.keys() == full_grads.keys()
    for name in rows_grads:
        torch.testing.assert_close(rows_grads[name], full_grads[name], rtol=1e-10, atol=1e-12, msg=name)


def test_the_class_switch_gives_every_positions_logits():
    model, inputs = tiny_lm(), batch()
    CausalLM.logits_on_response_rows = False
    try:
        out = model(inputs)
    finally:
        CausalLM.logits_on_response_rows = True
    assert out.logits.shape == (3, 10, VOCAB)


def test_a_batch_without_response_tokens_has_a_zero_loss_that_reaches_every_parameter():
    model, inputs = tiny_lm(), batch()
    inputs["labels"] = torch.full_like(inputs["labels"], -100)
    out, grads = loss_and_grads(model, inputs)
    assert out.kd_logits.shape == (0, VOCAB) and out.loss.item() == 0.0
    assert all(float(g.abs().sum()) == 0.0 for g in grads.values())


def test_a_backbone_that_ignores_a_boolean_logits_to_keep_falls_back_to_every_position(caplog):
    model, inputs = tiny_lm(), batch()
    expected = model(inputs, all_logits=True)
    forward = model.backbone.forward

    def ignores_the_mask(*args, logits_to_keep=0, **kw):
        return forward(*args, **kw)

    model.backbone.forward = ignores_the_mask
    with caplog.at_level(logging.WARNING):
        out = model(inputs)
    assert "ignores a boolean logits_to_keep" in caplog.text
    assert out.logits.shape == (3, 10, VOCAB)
    torch.testing.assert_close(out.kd_logits, expected.kd_logits, rtol=1e-12, atol=1e-12)
    caplog.clear()
    model(inputs)  # decided once
    assert "logits_to_keep" not in caplog.text


def test_label_word_predictions_read_each_examples_first_response_row():
    # Two examples; label words are tokens 7 ("no") and 9 ("yes"). Example 0 predicts its label
    # at position 2 (then one more response row), example 1 at position 4.
    labels = torch.full((2, 6), -100)
    labels[0, 3:5] = torch.tensor([9, 2])
    labels[1, 5] = 7
    kd_logits = torch.zeros(3, 12)
    kd_logits[0, 9] = 1.0   # example 0, the label row: "yes"
    kd_logits[1, 7] = 5.0   # example 0's second row, which must not be read
    kd_logits[2, 9] = 0.5   # example 1: "yes" over "no" (0.0)
    pred, gold = label_word_predictions(kd_logits, labels, [7, 9])
    assert pred.tolist() == [1, 1] and gold.tolist() == [1, 0]


def test_label_word_scoring_names_an_example_without_a_label_token():
    labels = torch.full((2, 4), -100)
    labels[0, 2] = 7
    with pytest.raises(ValueError, match="an example has no label token"):
        label_word_predictions(torch.zeros(1, 12), labels, [7, 9])
