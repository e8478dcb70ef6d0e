"""The importance probe against the analytic gradient of a linear head (SPEC properties)."""

import pytest
import torch
from transformers import BertConfig, BertModel

from flexkd import importance
from flexkd.importance import ProbeConfig, cached_probe, run_probe, top_k
from flexkd.models import SequenceClassifier


def tiny_classifier(num_labels=2, hidden=16, seed=0):
    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, vocab_size=40, max_position_embeddings=32)
    return SequenceClassifier(BertModel(cfg), num_labels).eval()


def probe_batches(n=24, length=9, batch=8, num_labels=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 40, (n, length), generator=gen)
    mask = torch.ones(n, length, dtype=torch.long)
    lengths = torch.randint(3, length + 1, (n,), generator=gen)
    for i, n_tok in enumerate(lengths):
        mask[i, n_tok:] = 0
    labels = torch.randint(0, num_labels, (n,), generator=gen)
    return [{"teacher": {"input_ids": ids[i:i + batch], "attention_mask": mask[i:i + batch],
                         "labels": labels[i:i + batch]}, "index": torch.arange(i, min(i + batch, n))}
            for i in range(0, n, batch)]


def test_token_gradient_equals_analytic_linear_head_gradient():
    model = tiny_classifier()
    batch = probe_batches()[0]["teacher"]
    h, g, mask = importance.token_gradients(model, batch, layer=model.layer_index(-1), target="gold")
    with torch.no_grad():
        logits = model(batch).logits
        p = logits.softmax(-1)
    w = model.head.weight.detach()
    for n in range(g.shape[0]):
        y = int(batch["labels"][n])
        n_tok = int(batch["attention_mask"][n].sum())
        expected = (1 - p[n, y]) * (w[y] - w[1 - y]) / n_tok
        for t in range(g.shape[1]):
            want = expected if mask[n, t] else torch.zeros_like(expected)
            torch.testing.assert_close(g[n, t], want, atol=1e-6, rtol=1e-4)


def test_grad_score_selects_top_weight_difference_and_is_stable():
    model = tiny_classifier()
    cfg = ProbeConfig(layer=-1, score="grad", k=5, examples=24, batch_size=8)
    result = run_probe(model, probe_batches(), cfg)
    dw = (model.head.weight[1] - model.head.weight[0]).abs().detach()
    assert result.selection.tolist() == top_k(dw, 5).tolist()
    assert result.stability == 1.0
    # Scores are proportional to |dW| (the same factor for every dim).
    ratio = result.scores / dw
    assert torch.allclose(ratio, ratio.mean().expand_as(ratio), rtol=1e-4)
    assert set(result.effective_dims) == {"0.9", "0.95", "0.99"}
    assert 1 <= result.effective_dims["0.9"] <= result.effective_dims["0.99"] <= 16


def test_top_k_order_and_ties():
    scores = torch.tensor([0.1, 5.0, 3.0, 5.0, 0.0])
    assert top_k(scores, 3).tolist() == [1, 3, 2]  # decreasing, ties by lower index


@pytest.mark.parametrize("score", ["grad_x_act", "fisher", "activation", "random"])
def test_other_scores_run_and_select_k(score):
    model = tiny_classifier()
    result = run_probe(model, probe_batches(), ProbeConfig(score=score, k=4, examples=24))
    assert result.selection.shape == (4,) and len(set(result.selection.tolist())) == 4
    assert torch.isfinite(result.scores).all()


def test_directions_rank_is_at_most_classes_minus_one_at_linear_head():
    model = tiny_classifier(num_labels=3)
    cfg = ProbeConfig(score="grad", selection="directions", k=4, examples=24)
    result = run_probe(model, probe_batches(num_labels=3), cfg)
    assert result.selection.shape == (16, 4)
    assert result.extra["informative_directions"] <= 2
    # Orthonormal directions.
    gram = result.selection.T @ result.selection
    torch.testing.assert_close(gram, torch.eye(4), atol=1e-4, rtol=0)


def test_probe_cache_hit_loads_instead_of_recomputing(tmp_path, monkeypatch):
    model = tiny_classifier()
    cfg = ProbeConfig(k=5, examples=24)
    first = cached_probe(model, probe_batches(), cfg, tmp_path, "teacher-a", {"data": 1})
    assert not first.cache_hit
    monkeypatch.setattr(importance, "run_probe", lambda *a, **k: pytest.fail("recomputed"))
    second = cached_probe(model, probe_batches(), cfg, tmp_path, "teacher-a", {"data": 1})
    assert second.cache_hit and second.selection.tolist() == first.selection.tolist()
    monkeypatch.undo()
    other = cached_probe(model, probe_batches(), cfg, tmp_path, "teacher-b", {"data": 1})
    assert not other.cache_hit  # another teacher is another key


@pytest.mark.parametrize("damage", ["truncate", "same_size_garbage"])
def test_corrupt_probe_cache_entry_is_rebuilt(tmp_path, damage):
    model = tiny_classifier()
    cfg = ProbeConfig(k=5, examples=24)
    first = cached_probe(model, probe_batches(), cfg, tmp_path, "t", {})
    path = tmp_path / "probe" / first.key / "probe.pt"
    data = path.read_bytes()
    # A short file fails the cheap size check; same-size garbage fails to load.
    path.write_bytes(data[:50] if damage == "truncate" else bytes(len(data)))
    again = cached_probe(model, probe_batches(), cfg, tmp_path, "t", {})
    assert not again.cache_hit and again.selection.tolist() == first.selection.tolist()
    assert path.read_bytes() == data
    assert cached_probe(model, probe_batches(), cfg, tmp_path, "t", {}).cache_hit


def test_causal_target_score_is_the_response_log_likelihood():
    from transformers import LlamaConfig, LlamaForCausalLM

    from flexkd.models import CausalLM

    torch.manual_seed(0)
    model = CausalLM(LlamaForCausalLM(LlamaConfig(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=32, vocab_size=50, max_position_embeddings=32))).eval()
    ids = torch.randint(3, 50, (2, 8))
    labels = ids.clone()
    labels[:, :5] = -100  # prompt
    labels[1, 7] = -100   # padding
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    out = model(inputs)
    n_targets = int((labels[:, 1:] != -100).sum())
    expected = -out.loss * n_targets  # CE is the mean negative log-likelihood of the targets
    got = importance.target_log_prob(model, out, inputs, "gold")
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    # The gradient lives only at positions that predict a response token.
    _, g, mask = importance.token_gradients(model, inputs, layer=2, target="gold")
    assert mask.tolist() == [[0, 0, 0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 1, 1, 0, 0]]
    assert (g[~mask].abs().max() == 0) and (g[mask].abs().sum(-1) > 0).all()
