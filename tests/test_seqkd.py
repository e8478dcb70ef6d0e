"""Sequence-level KD: the teacher's greedy answers, cached once, become the training targets."""

import pytest
import torch
from omegaconf import OmegaConf

from flexkd.data.datamodule import DistillDataModule
from flexkd.data.formatting import format_response
from flexkd.data.tasks import TaskSpec
from flexkd.errors import ConfigError
from flexkd.model_info import ModelInfo
from flexkd.models import IGNORE_INDEX, build_model, load_tokenizer
from flexkd.sources import resolve_source
from flexkd.strategies import SetupContext, build_strategy, seqkd

ROOT = OmegaConf.load("conf/pair/tiny_causal.yaml")
TRAIN = 6


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    resolve = lambda s: resolve_source(s, cache)  # noqa: E731
    task_cfg = OmegaConf.load("conf/task/tiny_instruct.yaml")
    task_cfg.max_train_examples = TRAIN
    task = TaskSpec.from_config(task_cfg, resolve)
    spec = OmegaConf.to_container(ROOT.teacher)
    tok = load_tokenizer(spec, resolve)
    teacher = build_model(spec, "instruction", tok, resolve=resolve, seed=0).eval()
    student = build_model(OmegaConf.to_container(ROOT.student), "instruction", tok, resolve=resolve)
    return cache, task, tok, teacher, student


def datamodule(task, tok):
    data = DistillDataModule(task, tok, batch_size=2, bucket_by_length=False)
    data.setup()
    return data


def greedy_by_hand(teacher, prompt: list[int], steps: int, eos: int) -> list[int]:
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(steps):
            nxt = int(teacher.backbone(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            if nxt == eos:
                break
            ids.append(nxt)
            out.append(nxt)
    return out


def test_answers_are_cached_once_and_become_the_training_targets(setting, monkeypatch):
    cache, task, tok, teacher, student = setting
    calls = []
    real = seqkd.generate_answers
    monkeypatch.setattr(seqkd, "generate_answers", lambda *a, **k: calls.append(1) or real(*a, **k))

    data = datamodule(task, tok)
    original = [e["student"].labels for e in data.splits["train"]]
    strategy = build_strategy({"_target_": "flexkd.strategies.seqkd.SequenceKD", "name": "seqkd",
                               "generation_batch_size": 4})
    strategy.setup(SetupContext(teacher=teacher, student=student, datamodule=data,
                                cache_dir=str(cache), teacher_fingerprint="tiny-teacher"))
    info = strategy.diagnostics()["generations"]
    assert calls == [1] and not info["cache_hit"] and info["answers"] == TRAIN
    assert "/generations/" in info["path"]

    answers = seqkd.cached_generations(teacher, data, {"decoding": "greedy", "max_new_tokens": 16},
                                       str(cache), "tiny-teacher")[0]
    assert calls == [1]  # the second look-up is a cache hit: nothing generated
    # Greedy, left padding included, equals an argmax loop over each lone prompt.
    fresh = datamodule(task, tok)
    for i in range(TRAIN):
        prompt = seqkd.prompt_ids(fresh.splits["train"][i]["teacher"])
        by_hand = greedy_by_hand(teacher, prompt, 16, tok.eos_token_id)
        assert answers[i] == tok.decode(by_hand, skip_special_tokens=True).strip()
    # The encoded training targets are the teacher's answers (+ EOS), on both sides.
    assert any(e["student"].labels != o for e, o in zip(data.splits["train"], original, strict=True))
    for i, ex in enumerate(data.splits["train"]):
        for side in ("student", "teacher"):
            target = [t for t in ex[side].labels if t != IGNORE_INDEX]
            expected = tok(format_response(answers[i]), add_special_tokens=False)["input_ids"]
            assert target == expected + [tok.eos_token_id]
        assert seqkd.prompt_ids(ex["student"]) == seqkd.prompt_ids(fresh.splits["train"][i]["student"])
    assert [e["student"].labels for e in data.splits["validation"]] == \
        [e["student"].labels for e in fresh.splits["validation"]]  # only train is swapped

    # Another student / seed: same entry, no generation.
    again = datamodule(task, tok)
    other = build_strategy({"_target_": "flexkd.strategies.seqkd.SequenceKD", "name": "seqkd"})
    other.setup(SetupContext(teacher=teacher, student=student, datamodule=again,
                             cache_dir=str(cache), teacher_fingerprint="tiny-teacher", seed=3))
    assert calls == [1] and other.diagnostics()["generations"]["cache_hit"]
    assert [e["student"].labels for e in again.splits["train"]] == \
        [e["student"].labels for e in data.splits["train"]]


def test_seqkd_refuses_classification_in_one_line():
    strategy = build_strategy({"_target_": "flexkd.strategies.seqkd.SequenceKD", "name": "seqkd"})
    clf = ModelInfo("student", "s", 8, 2, kind="classifier")
    lm = ModelInfo("teacher", "t", 16, 2, kind="causal_lm")
    with pytest.raises(ConfigError, match="needs an instruction task") as e:
        strategy.check_pair(clf, lm)
    assert "\n" not in str(e.value)
    strategy.check_pair(ModelInfo("student", "s", 8, 2, kind="causal_lm"), lm)


def test_replace_responses_refuses_a_classification_task(tmp_path):
    resolve = lambda s: resolve_source(s, tmp_path)  # noqa: E731
    task = TaskSpec.from_config(OmegaConf.load("conf/task/tiny_cls.yaml"), resolve)
    tok = load_tokenizer({"tokenizer": "fixture:tiny_tokenizer"}, resolve)
    with pytest.raises(ConfigError, match="only instruction tasks have responses"):
        DistillDataModule(task, tok).replace_responses("train", {0: "x"})
