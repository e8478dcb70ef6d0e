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

from flexkd.data.datamodule import DistillDataModule
from flexkd.data.tasks import TaskSpec
from flexkd.models import build_model, uses_label_words
from flexkd.sources import resolve_source
from flexkd.step import LiveTeacher, distill_terms
from flexkd.strategies import SetupContext, build_strategy
from flexkd.teacher_store import STORE_KIND, StoredTeacher, store_decision, teacher_store

ROOT = Path(__file__).resolve().parents[1]

BF16_ULP = 2.0**-7


def config(pair: str, task: str = "tiny_cls", strategy: str = "sft"):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        # 96 training examples and a 64-example probe keep each case a few seconds.
        return compose("config", overrides=[f"pair={pair}", f"task={task}", f"strategy={strategy}",
                                            "task.max_train_examples=96"])


def prepared(name: str, pair: str, cache_dir, **knobs):
    """Teacher, student, strategy (set up) and data of a tiny pair on tiny_cls."""
    cfg = config(pair, strategy=name)
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
    """The live teacher with every output rounded to bf16, as the store keeps them."""

    def __init__(self, live):
        self.live = live

    def __call__(self, batch):
        out = self.live(batch)
        r = lambda t: None if t is None else t.to(torch.bfloat16).to(t.dtype)  # noqa: E731
        return dataclasses.replace(out, kd_logits=r(out.kd_logits), logits=r(out.logits),
                                   hidden={k: r(v) for k, v in out.hidden.items()})


def terms_and_grads(strategy, student, batch, teacher_outputs):
    student, strategy = copy.deepcopy(student), copy.deepcopy(strategy)
    terms = distill_terms(strategy, student, batch, teacher_outputs)
    sum(terms.values()).backward()
    grads = {n: p.grad for n, p in student.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in terms.items()}, grads


def assert_losses_match_live(strategy, student, teacher, batch, stored):
    """Terms and student gradients from the store equal those from the live teacher rounded to
    bf16 (rtol 1e-4), and those from the unrounded live teacher within rtol 2e-2."""
    live = LiveTeacher(teacher, strategy)
    s_terms, s_grads = terms_and_grads(strategy, student, batch, stored)
    r_terms, r_grads = terms_and_grads(strategy, student, batch, RoundedLive(live))
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


def test_auto_is_off_without_teacher_terms_or_for_causal_logits(tmp_path):
    cfg, teacher, _, sft, data = prepared("sft", "tiny_encoder", tmp_path)
    assert store_decision("auto", sft, teacher) == (False, "strategy 'sft' needs no teacher outputs")
    handle = build(cfg, teacher, sft, data, tmp_path)
    assert handle.outputs is None and not handle.info["enabled"]
    _, teacher, _, kd, _ = prepared("logit_kd", "tiny_causal", tmp_path)
    enabled, reason = store_decision("auto", kd, teacher)
    assert not enabled and "causal" in reason
    _, teacher, _, flex, _ = prepared("flexkd", "tiny_encoder", tmp_path)
    assert store_decision("off", flex, teacher) == (False, "teacher_store=off")
    assert store_decision("auto", flex, teacher)[0]


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
