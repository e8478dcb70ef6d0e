"""The teacher cache: one fine-tune per (teacher, task, settings); corrupt entries are rebuilt."""

import logging
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from flexkd.cache import MANIFEST_NAME
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


def prepare(cfg, task, tok, cache_dir):
    return prepare_teacher(cfg.pair.teacher, cfg.teacher_finetune, cfg.trainer, task, tok,
                           cache_dir, resolve_source, eval_batch_size=cfg.data.eval_batch_size)


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_second_call_hits_the_cache_with_identical_weights(tmp_path, caplog):
    cfg, task, tok = setup(tmp_path)
    with caplog.at_level(logging.INFO, logger="flexkd.training"):
        first = prepare(cfg, task, tok, tmp_path)
    # Progress reaches the log (not only a terminal's progress bar): 5 steps, one line each.
    assert "teacher fine-tune: step 5/5, loss " in caplog.text
    second = prepare(cfg, task, tok, tmp_path)
    assert not first.info["cache_hit"] and second.info["cache_hit"]
    assert first.info["finetune_seconds"] > 0 and "finetune_seconds" not in second.info
    assert first.fingerprint == second.fingerprint
    w1, w2 = weights(first.model), weights(second.model)
    assert w1.keys() == w2.keys() and all((w1[k] == w2[k]).all() for k in w1)
    assert second.metrics == first.metrics


def test_truncated_or_missing_files_are_detected_and_rebuilt(tmp_path, caplog):
    cfg, task, tok = setup(tmp_path)
    entry = Path(prepare(cfg, task, tok, tmp_path).info["path"])
    weights_file = next(entry.glob("model/*.safetensors"))
    weights_file.write_bytes(weights_file.read_bytes()[:100])  # a torn write
    with caplog.at_level(logging.WARNING, logger="flexkd.cache"):
        rebuilt = prepare(cfg, task, tok, tmp_path)
    assert not rebuilt.info["cache_hit"]
    assert f"{weights_file.name} has 100 bytes" in caplog.text and "rebuilding it" in caplog.text
    assert prepare(cfg, task, tok, tmp_path).info["cache_hit"]

    (entry / MANIFEST_NAME).unlink()  # interrupted before the manifest was written
    assert not prepare(cfg, task, tok, tmp_path).info["cache_hit"]


def test_the_fine_tune_precision_is_part_of_the_teachers_key(tmp_path):
    # A bf16 fine-tune is another teacher than an fp32 one; reusing it would hand an fp32 run
    # (and its probe and store, keyed by the teacher's fingerprint) the bf16 teacher.
    cfg, task, tok = setup(tmp_path)
    fp32 = prepare(cfg, task, tok, tmp_path)
    cfg.trainer.precision = "bf16-mixed"
    bf16 = prepare(cfg, task, tok, tmp_path)
    assert not bf16.info["cache_hit"] and bf16.fingerprint != fp32.fingerprint
    cfg.trainer.precision = "32"  # Lightning's other spelling of fp32: the same regime
    assert prepare(cfg, task, tok, tmp_path).fingerprint == fp32.fingerprint


def test_a_teacher_with_a_chosen_kernel_is_its_own_entry_and_reloads_with_it(tmp_path):
    cfg, task, tok = setup(tmp_path)
    default = prepare(cfg, task, tok, tmp_path)
    OmegaConf.set_struct(cfg, False)
    cfg.pair.teacher.attn_implementation = "eager"
    eager, again = (prepare(cfg, task, tok, tmp_path) for _ in range(2))
    assert default.model.attention_kernel == "sdpa" and not eager.info["cache_hit"]
    assert again.info["cache_hit"] and again.model.attention_kernel == "eager"


def test_a_teacher_without_a_fine_tune_is_rebuilt_from_its_spec_on_a_cache_hit(tmp_path):
    # Only its scores are cached (no weights are saved): the hit builds the same model again.
    cfg, task, tok = setup(tmp_path)
    cfg.teacher_finetune.enabled = False
    first, second = (prepare(cfg, task, tok, tmp_path) for _ in range(2))
    assert not first.info["cache_hit"] and second.info["cache_hit"]
    assert not list(Path(first.info["path"]).glob("model"))
    w1, w2 = weights(first.model), weights(second.model)
    assert all(torch.equal(w1[k], w2[k]) for k in w1) and second.metrics == first.metrics
