"""Strategies in isolation: configs and their classes, knobs, pair checks, parameter counts,
degenerate batches."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from transformers import BertConfig, BertModel

from flexkd.errors import ConfigError
from flexkd.models import SequenceClassifier
from flexkd.step import LiveTeacher, distill_terms
from flexkd.strategies import SetupContext, Strategy, build_strategy, strategy_class, variant_of
from flexkd.strategies.base import available_strategies, load_strategy_config

CONF = Path(__file__).resolve().parents[1] / "conf"
ALL = sorted(p.stem for p in (CONF / "strategy").glob("*.yaml"))


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

    def __init__(self, batches=None):
        gen = torch.Generator().manual_seed(0)
        self.batches = batches or [batch(torch.randint(5, 30, (4, 6), generator=gen),
                                         torch.ones(4, 6, dtype=torch.long),
                                         torch.tensor([0, 1, 0, 1]))]

    class task:  # noqa: N801  (stands in for a TaskSpec)
        @staticmethod
        def fingerprint():
            return {"task": "unit"}

    def probe_dataloader(self, examples, batch_size):
        return self.batches


def prepared(name, d_teacher=16, d_student=8, **kwargs):
    teacher, student = classifier(d_teacher), classifier(d_student, seed=1)
    strategy = build_strategy(load_strategy_config(name), **kwargs)
    strategy.setup(SetupContext(teacher=teacher, student=student, datamodule=ProbeData()))
    return strategy, teacher, student


def step_losses(strategy, teacher, student, b):
    return distill_terms(strategy, student, b, LiveTeacher(teacher, strategy))


def test_the_shipped_strategies_are_discovered_and_unknown_names_list_them():
    assert available_strategies() == ALL
    assert {"flexkd", "raw", "projection", "cka", "logit_kd", "sft"} <= set(ALL)
    with pytest.raises(ConfigError, match=r"strategy='flexdk'.*choose one of: cka, flexkd"):
        build_strategy("flexdk")


@pytest.mark.parametrize("name", ALL)
def test_every_yaml_value_equals_its_class_default(name):
    """One default per knob: a YAML may show a knob, but only with the class's value."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"strategy={name}"])
    composed = OmegaConf.to_container(cfg.strategy, resolve=True)
    assert composed["name"] == name
    cls = strategy_class(composed)
    defaults = cls.Knobs().model_dump(mode="json")
    shown = {k: v for k, v in composed.items() if k not in ("_target_", "name")}
    assert shown, f"{name}.yaml shows no knob"
    for knob, value in shown.items():
        assert knob in defaults, f"{name}.yaml: {knob} is not a knob of {cls.__name__}"
        assert cls.Knobs(**{knob: value}).model_dump(mode="json")[knob] == defaults[knob], (
            f"{name}.yaml sets {knob}={value}, but {cls.__name__} declares {defaults[knob]}")
    assert variant_of(composed) == {"strategy": name, "settings": {}, "label": name}


def test_feature_weights_have_one_default_each_the_beta_sweep_choice():
    # experiment=beta_sweep, chosen on validation: flexkd 0.5, projection 0.25, cka 0.5.
    for name, cls, beta in (("flexkd", "flexkd.FlexKD", 0.5), ("projection", "features.Projection", 0.25),
                            ("cka", "features.CKA", 0.5)):
        assert build_strategy(name).beta == beta
        assert strategy_class({"_target_": f"flexkd.strategies.{cls}"}).Knobs().beta == beta


def test_variant_names_the_knobs_that_differ_sorted():
    cfg = {**load_strategy_config("flexkd"), "score": "random", "beta": 0.1, "alpha": 1.0}
    assert variant_of(cfg) == {"strategy": "flexkd", "settings": {"beta": 0.1, "score": "random"},
                               "label": "flexkd[beta=0.1,score=random]"}
    pairs = variant_of({**load_strategy_config("cka"), "layer_pairs": [[1, 2], [-1, -1]]})
    assert pairs["label"] == "cka[layer_pairs=[[1,2],[-1,-1]]]"


def test_bad_knobs_give_one_line_with_the_declared_range_or_choices():
    with pytest.raises(ConfigError) as e:
        build_strategy("flexkd", lam=-1.0)
    assert str(e.value) == ("strategy.lam=-1.0 is out of range: it must be >= 0 "
                            "(the off-diagonal weight of the corr loss)")
    with pytest.raises(ConfigError, match=r"strategy.feature_loss='cor' is not a valid choice "
                       r"\(did you mean 'corr'\?\); choose one of: corr, corr_diag, mse, cosine"):
        build_strategy("flexkd", feature_loss="cor")
    with pytest.raises(ConfigError, match=r"strategy.k is not a key of strategy 'cka'"):
        build_strategy("cka", k=3)
    with pytest.raises(ConfigError, match=r"strategy.layer_pairs\[0\]=\[1\] has the wrong length"):
        build_strategy("sft", layer_pairs=[[1]])


def test_target_errors_are_one_line():
    with pytest.raises(ConfigError, match="strategy._target_ is not set"):
        strategy_class({"name": "x"})
    with pytest.raises(ConfigError, match=r"strategy._target_='nowhere.Nope' cannot be imported"):
        strategy_class({"_target_": "nowhere.Nope"})
    with pytest.raises(ConfigError, match="is not a subclass of flexkd.strategies.base.Strategy"):
        strategy_class({"_target_": "torch.nn.Linear"})


def test_a_plain_strategy_is_fine_tuning():
    plain = Strategy()
    assert (plain.alpha, plain.beta, plain.gamma) == (1.0, 0.0, 0.0)
    assert not plain.needs_teacher and not plain.needs_teacher_for_config()


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


def test_readme_knob_table_is_the_generated_one():
    from flexkd.strategies.knob_table import README, knob_table, readme_section

    table = knob_table()
    assert readme_section(README.read_text()) == table, (
        "README.md's knob table is stale; regenerate: python -m flexkd.strategies.knob_table --write")
    assert ("| `beta` | 0.5 (cka, flexkd); 0.0 (logit_kd, seqkd, sft); 0.25 (projection); "
            "1.0 (raw) | >= 0 |") in table
    assert "| `score` | grad (flexkd) | grad \\| grad_x_act \\| fisher \\| activation \\| random |" in table


def test_a_knob_may_not_shadow_the_interface():
    from pydantic import Field

    with pytest.raises(TypeError, match=r"knob names \['losses', 'training'\] are taken"):
        class Bad(Strategy):  # noqa: F841
            class Knobs(Strategy.Knobs):
                losses: int = Field(1)
                training: bool = Field(True)


@pytest.mark.parametrize("name, knobs", [("flexkd", {}), ("flexkd", {"selection": "directions"}),
                                         ("cka", {})])
def test_feature_losses_under_bf16_autocast_match_fp32(name, knobs):
    """The loss reductions run in fp32 inside autocast (flexkd.losses), and the strategy itself
    must not hand them bf16 copies. The models run in fp32 outside autocast here, so the loss
    and the student's gradients see the same features both times: only the strategy's own
    arithmetic is under test."""
    strategy, teacher, student = prepared(name, alpha=0.0, beta=1.0, **knobs)
    gen = torch.Generator().manual_seed(3)
    b = batch(torch.randint(5, 30, (4, 7), generator=gen), torch.ones(4, 7, dtype=torch.long),
              torch.tensor([0, 1, 1, 0]))
    b["student"]["attention_mask"][1, 5:] = 0

    def loss_and_grads(autocast):
        student.zero_grad()
        teacher_out = LiveTeacher(teacher, strategy)(b)
        student_out = student(b["student"], layers=strategy.student_layers())
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = strategy.losses(b, teacher_out, student_out)["feature"]
        assert loss.dtype == torch.float32
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}

    (fp32_loss, fp32_grads), (bf16_loss, bf16_grads) = loss_and_grads(False), loss_and_grads(True)
    assert fp32_loss > 0 and fp32_grads
    torch.testing.assert_close(bf16_loss, fp32_loss, rtol=1e-3, atol=0)
    assert bf16_grads.keys() == fp32_grads.keys()
    for n, g in fp32_grads.items():
        scale = g.abs().max().clamp_min(1e-12)
        assert (bf16_grads[n] - g).abs().max() <= 1e-3 * scale, n
