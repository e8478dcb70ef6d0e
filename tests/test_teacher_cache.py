"""The teacher cache: one fine-tune per (teacher, task, settings); corrupt entries are rebuilt."""

import logging
from pathlib import Path

from hydra import compose, initialize_config_dir

from flexkd.data.tasks import TaskSpec
from flexkd.models import load_tokenizer
from flexkd.sources import resolve_source
from flexkd.teacher import prepare_teacher

CONF = Path(__file__).resolve().parents[1] / "conf"


def setup(tmp_path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[
            "pair=tiny_encoder", "task=tiny_cls", "teacher_finetune.max_steps=5",
            "trainer.precision=32-true", "trainer.enable_progress_bar=false"])
    task = TaskSpec.from_config(cfg.task, resolve_source)
    tok = load_tokenizer(dict(cfg.pair.teacher), resolve_source)
    return cfg, task, tok


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_second_call_hits_the_cache_with_identical_weights(tmp_path):
    cfg, task, tok = setup(tmp_path)
    first = prepare_teacher(cfg, task, tok, tmp_path, resolve_source)
    second = prepare_teacher(cfg, task, tok, tmp_path, resolve_source)
    assert not first.info["cache_hit"] and second.info["cache_hit"]
    assert first.fingerprint == second.fingerprint
    w1, w2 = weights(first.model), weights(second.model)
    assert w1.keys() == w2.keys() and all((w1[k] == w2[k]).all() for k in w1)
    assert second.metrics == first.metrics


def test_truncated_or_missing_files_are_detected_and_rebuilt(tmp_path, caplog):
    cfg, task, tok = setup(tmp_path)
    entry = Path(prepare_teacher(cfg, task, tok, tmp_path, resolve_source).info["path"])
    weights_file = next(entry.glob("model/*.safetensors"))
    weights_file.write_bytes(weights_file.read_bytes()[:100])  # a torn write
    with caplog.at_level(logging.WARNING, logger="flexkd.teacher"):
        rebuilt = prepare_teacher(cfg, task, tok, tmp_path, resolve_source)
    assert not rebuilt.info["cache_hit"]
    assert "incomplete or corrupt" in caplog.text
    assert prepare_teacher(cfg, task, tok, tmp_path, resolve_source).info["cache_hit"]

    (entry / "flexkd-cache.json").unlink()  # interrupted before the marker was written
    assert not prepare_teacher(cfg, task, tok, tmp_path, resolve_source).info["cache_hit"]
