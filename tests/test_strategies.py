"""Strategies in isolation: registry, pair checks, parameter counts, degenerate batches."""

import pytest
import torch
from transformers import BertConfig, BertModel

from flexkd.errors import ConfigError
from flexkd.models import SequenceClassifier
from flexkd.step import LiveTeacher, distill_terms
from flexkd.strategies import STRATEGIES, SetupContext, build_strategy

ALL = ["flexkd", "raw", "projection", "cka", "logit_kd", "sft"]


def classifier(hidden, layers=2, seed=0):
    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=2 * hidden, vocab_size=30, max_position_embeddings=16)
    return SequenceClassifier(BertModel(cfg), 2).eval()


def batch(ids, mask, labels):
    side = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return {"student": side, "teacher": side, "index": torch.arange(ids.shape[0])}


class ProbeData:
    """The slice of the datamodule a strategy's setup uses."""

    shared = True

    def __init__(self):
        gen = torch.Generator().manual_seed(0)
        self.batches = [batch(torch.randint(5, 30, (4, 6), generator=gen),
                              torch.ones(4, 6, dtype=torch.long), torch.tensor([0, 1, 0, 1]))]

    class task:  # noqa: N801  (stands in for a TaskSpec)
        @staticmethod
        def fingerprint():
            return {"task": "unit"}

    def probe_dataloader(self, examples, batch_size):
        return self.batches


def prepared(name, d_teacher=16, d_student=8, **kwargs):
    teacher, student = classifier(d_teacher), classifier(d_student, seed=1)
    strategy = build_strategy(name, **kwargs)
    strategy.setup(SetupContext(teacher=teacher, student=student, datamodule=ProbeData()))
    return strategy, teacher, student


def step_losses(strategy, teacher, student, b):
    return distill_terms(strategy, student, b, LiveTeacher(teacher, strategy))


def test_every_strategy_is_registered_and_unknown_names_list_them():
    assert sorted(STRATEGIES) == sorted(ALL)
    with pytest.raises(ConfigError, match=r"valid strategies: \['cka', 'flexkd'"):
        build_strategy("flexdk")


def test_raw_names_both_widths_and_suggests_alternatives():
    with pytest.raises(ConfigError, match=r"d_S=8.*d_T=16.*projection.*flexkd"):
        prepared("raw")


def test_extra_parameters_per_strategy():
    assert prepared("flexkd")[0].extra_trainable_parameters() == 0
    assert prepared("projection")[0].extra_trainable_parameters() == 8 * 16 + 16
    assert prepared("cka")[0].extra_trainable_parameters() == 0


def test_teacher_is_only_asked_for_what_the_strategy_uses():
    assert not prepared("sft")[0].needs_teacher
    logit = prepared("logit_kd")[0].teacher_request()
    assert logit.logits and logit.layers == ()
    flex = prepared("flexkd", layer_pairs=[[1, 1], [-1, -1]])[0]
    assert flex.teacher_request().layers == (1, 2) and flex.student_layers() == (1, 2)
    assert not flex.teacher_request().logits


@pytest.mark.parametrize("name", ["flexkd", "projection", "cka", "logit_kd", "sft"])
@pytest.mark.parametrize("case", ["one_valid_token", "single_example", "constant_input"])
def test_degenerate_batches_give_finite_losses_and_gradients(name, case):
    strategy, teacher, student = prepared(name)
    if case == "one_valid_token":  # all padding but one token
        ids, mask = torch.tensor([[7, 0, 0, 0], [0, 0, 0, 0]]), torch.tensor([[1, 0, 0, 0], [0] * 4])
        mask[1, 0] = 0
        ids, mask = ids[:1], mask[:1]
    elif case == "single_example":
        ids, mask = torch.tensor([[5, 6, 7, 8]]), torch.ones(1, 4, dtype=torch.long)
    else:  # every token identical -> near-constant features
        ids, mask = torch.full((3, 5), 9), torch.ones(3, 5, dtype=torch.long)
    b = batch(ids, mask, torch.zeros(ids.shape[0], dtype=torch.long))
    terms = step_losses(strategy, teacher, student, b)
    total = sum(terms.values())
    total.backward()
    assert all(torch.isfinite(v) for v in terms.values()), terms
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_flexkd_pairs_student_dim_i_with_selected_teacher_dim():
    strategy, teacher, student = prepared("flexkd", feature_loss="mse", beta=1.0, alpha=0.0)
    sel = strategy.selection_0
    teacher_rows = torch.randn(10, 16)
    target = strategy.teacher_targets(teacher_rows, 0)
    assert torch.equal(target, teacher_rows[:, sel])
    # A student that reproduces exactly the selected teacher dims has zero feature loss.
    assert strategy.pair_loss(teacher_rows[:, sel], teacher_rows, 0).item() == 0.0


def test_batch_sampler_shards_batches_across_ranks_and_resumes_mid_epoch():
    from flexkd.data.sampling import ResumableBatchSampler

    full = list(ResumableBatchSampler(10, 3, seed=1, rank=0, world_size=1))
    ranks = [list(ResumableBatchSampler(10, 3, seed=1, rank=r, world_size=2)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 2
    assert ranks[0] == [full[0], full[2]] and ranks[1] == [full[1], full[3]]
    sampler = ResumableBatchSampler(10, 3, seed=1, rank=0, world_size=1)
    sampler.set_epoch(0)
    sampler.fast_forward(2)
    assert list(sampler) == full[2:]
    sampler.set_epoch(1)
    assert list(sampler) != full and sorted(sum(list(sampler), [])) == list(range(10))
