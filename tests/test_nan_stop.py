"""A NaN loss stops the run, names the term and step, and leaves the last good checkpoint."""

import json
import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import flexkd.losses
from flexkd.errors import NonFiniteLossError
from flexkd.pipeline import run

CONF = Path(__file__).resolve().parents[1] / "conf"


def test_nan_mid_training_keeps_the_last_good_checkpoint(tmp_path, cache_dir, monkeypatch):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[
            "pair=tiny_encoder", "task=tiny_cls", "strategy=logit_kd", "trainer.max_steps=20",
            "checkpoint.every_n_steps=2", "teacher_finetune.max_steps=40",
            "trainer.precision=32-true", "trainer.enable_progress_bar=false",
            f"cache_dir={cache_dir}", f"output_dir={tmp_path}"])
    calls = {"n": 0}
    original = flexkd.losses.logit_divergence

    def diverging(*args, **kwargs):  # fine for 7 steps, then NaN
        calls["n"] += 1
        value = original(*args, **kwargs)
        return value * torch.tensor(math.nan) if calls["n"] > 7 else value

    monkeypatch.setattr(flexkd.losses, "logit_divergence", diverging)
    with pytest.raises(NonFiniteLossError, match=r"loss term 'logit' is nan at step 7"):
        run(cfg)
    info = json.loads((tmp_path / "checkpoints" / "last.json").read_text())
    assert info["step"] == 6  # the last multiple of 2 before the bad step
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] == 6
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())
    assert not (tmp_path / "results.json").exists()
