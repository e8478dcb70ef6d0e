"""Healing a pruned causal student: whole-text next-token loss, cached per student and setting."""

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from flexkd import healing
from flexkd.data.datamodule import DistillDataModule
from flexkd.data.tasks import TaskSpec
from flexkd.errors import ConfigError
from flexkd.healing import WholeTextLM, heal_settings, healed_student
from flexkd.models import build_model, load_tokenizer
from flexkd.sources import resolve_source

PAIR = OmegaConf.load("conf/pair/tiny_causal.yaml")
TRAINER = OmegaConf.create({"accelerator": "cpu", "devices": 1, "precision": "32-true",
                            "enable_progress_bar": False})
HEAL = {"steps": 12, "lr": 3e-3, "weight_decay": 0.0, "warmup_ratio": 0.0, "seed": 0}


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    resolve = lambda s: resolve_source(s, cache)  # noqa: E731
    task_cfg = OmegaConf.load("conf/task/tiny_instruct.yaml")
    task_cfg.max_train_examples = 16
    task = TaskSpec.from_config(task_cfg, resolve)
    spec = OmegaConf.to_container(PAIR.student)
    tok = load_tokenizer(spec, resolve)
    data = DistillDataModule(task, tok, batch_size=4, bucket_by_length=False)
    data.setup()
    return cache, spec, tok, data, resolve


def test_whole_text_loss_is_the_next_token_loss_on_every_real_token(setting):
    _, spec, tok, data, resolve = setting
    model = build_model(spec, "instruction", tok, resolve=resolve, seed=0).eval()
    batch = next(iter(data.train_dataloader()))["student"]
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert (mask == 0).any(), "the batch should hold padding"
    with torch.no_grad():
        loss = WholeTextLM(model.backbone)(batch).loss
        logits = model.backbone(input_ids=ids, attention_mask=mask).logits
    terms = [F.cross_entropy(logits[b, t - 1], ids[b, t], reduction="sum")
             for b in range(ids.shape[0]) for t in range(1, ids.shape[1]) if mask[b, t]]
    torch.testing.assert_close(loss, torch.stack(terms).mean(), rtol=1e-5, atol=1e-6)
    # The task loss reads the response only: fewer tokens, another number.
    with torch.no_grad():
        assert not torch.isclose(model(batch).loss, loss)


def test_healing_lowers_the_loss_and_is_built_once(setting, monkeypatch):
    cache, spec, tok, data, resolve = setting
    student = build_model(spec, "instruction", tok, resolve=resolve, seed=0)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    healed, record = healed_student(student, HEAL, data, tok, TRAINER, cache)
    assert record["settings"] == HEAL and not record["cache_hit"]
    assert record["validation_after"]["loss"] < record["validation_before"]["loss"]
    assert any(not torch.equal(before[k], v) for k, v in healed.state_dict().items())

    calls = []
    monkeypatch.setattr(healing, "evaluate_model", lambda *a, **k: calls.append(1))
    again, hit = healed_student(build_model(spec, "instruction", tok, resolve=resolve, seed=0),
                                HEAL, data, tok, TRAINER, cache)
    assert hit["cache_hit"] and not calls and hit["validation_after"] == record["validation_after"]
    for k, v in healed.state_dict().items():
        assert torch.equal(again.state_dict()[k], v)
    # Other settings are another entry.
    other = healed_student(build_model(spec, "instruction", tok, resolve=resolve, seed=0),
                           {**HEAL, "steps": 2}, data, tok, TRAINER, cache)[1]
    assert not other["cache_hit"] and other["path"] != record["path"]


def test_a_student_healed_with_a_chosen_kernel_keeps_it_in_its_own_entry(setting):
    cache, spec, tok, data, resolve = setting
    heal = {**HEAL, "steps": 3}

    def heal_with(attention):
        student = build_model({**spec, "attn_implementation": attention}, "instruction", tok,
                              resolve=resolve, seed=0)
        return healed_student(student, heal, data, tok, TRAINER, cache, attention=attention)

    default, eager = heal_with(None), heal_with("eager")
    assert (default[0].attention_kernel, eager[0].attention_kernel) == ("sdpa", "eager")
    assert not eager[1]["cache_hit"] and eager[1]["path"] != default[1]["path"]
    again = heal_with("eager")  # from the cache: loaded with the kernel it was healed with
    assert again[1]["cache_hit"] and again[0].attention_kernel == "eager"


def test_heal_settings_and_students_it_cannot_heal(setting):
    cache, spec, tok, data, resolve = setting
    assert heal_settings({"heal": {"steps": 0}}) is None and heal_settings({}) is None
    assert heal_settings({"heal": HEAL}) == HEAL
    encoder = OmegaConf.to_container(OmegaConf.load("conf/pair/tiny_encoder.yaml").student)
    enc_tok = load_tokenizer(encoder, resolve)
    classifier = build_model(encoder, "classification", enc_tok, ["a", "b"], resolve=resolve)
    with pytest.raises(ConfigError, match="drop heal"):
        healed_student(classifier, HEAL, data, tok, TRAINER, cache)
