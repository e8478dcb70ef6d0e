"""End-to-end runs through run.py (subprocesses), on the tiny pairs and tasks."""

import json
import shutil
from pathlib import Path

import pytest
from safetensors import safe_open

from benchmarks import tables

pytestmark = pytest.mark.slow

ENCODER_STRATEGIES = ["flexkd", "projection", "cka", "logit_kd", "sft"]


def sweep_results(out: Path) -> list[dict]:
    found = sorted(out.glob("*/results.json"))
    return [json.loads(p.read_text()) for p in found]


def saved_tensor_shapes(student_dir: Path) -> dict:
    shapes = {}
    for file in student_dir.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            shapes.update({k: f.get_slice(k).get_shape() for k in f.keys()})
    return shapes


def test_encoder_pair_every_strategy(run_cli):
    run = run_cli("pair=tiny_encoder", "task=tiny_cls",
                  f"strategy={','.join(ENCODER_STRATEGIES)}", multirun=True)
    results = {r["strategy"]: r for r in sweep_results(run.out_dir)}
    assert sorted(results) == sorted(ENCODER_STRATEGIES)
    for name, r in results.items():
        assert r["pair"] == "tiny_encoder" and r["task"] == "tiny_cls" and r["seed"] == 0
        assert 0.0 <= r["metrics"]["student"]["accuracy"] <= 1.0
        assert r["metrics"]["teacher"]["accuracy"] > 0.6, "teacher fine-tune gave no signal"
        assert set(r["timings"]) >= {"teacher", "probe", "distill", "evaluate"}
        assert r["config"]["strategy"]["name"] == name
    # Extra trainable parameters: none for Flex-KD, d_S*d_T + d_T for the projector.
    assert results["flexkd"]["params"]["strategy_extra_trainable"] == 0
    assert results["projection"]["params"]["strategy_extra_trainable"] == 32 * 128 + 128
    assert results["cka"]["params"]["strategy_extra_trainable"] == 0
    # Flex-KD probe diagnostics.
    probe = results["flexkd"]["probe"]["probes"][0]
    assert len(probe["selected"]) == 32 and len(set(probe["selected"])) == 32
    assert set(probe["effective_dims"]) == {"0.9", "0.95", "0.99"}
    assert 0.0 <= probe["stability_overlap"] <= 1.0
    # The teacher is fine-tuned once for the sweep; later jobs hit the cache.
    hits = [r["teacher"]["cache_hit"] for r in results.values()]
    assert hits.count(False) <= 1
    # The saved student holds student weights only (width 32), nothing of the teacher (128).
    student_dir = Path(results["projection"]["paths"]["student"])
    shapes = saved_tensor_shapes(student_dir)
    assert shapes and all(shape[-1] != 128 for shape in shapes.values())
    assert sum(_numel(s) for s in shapes.values()) + 32 * 2 + 2 == results["projection"]["params"]["student"]


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def test_causal_pair_every_strategy(run_cli):
    run = run_cli("pair=tiny_causal", "task=tiny_instruct",
                  f"strategy={','.join(ENCODER_STRATEGIES)}", multirun=True)
    results = {r["strategy"]: r for r in sweep_results(run.out_dir)}
    assert sorted(results) == sorted(ENCODER_STRATEGIES)
    for r in results.values():
        student = r["metrics"]["student"]
        assert student["perplexity"] > 1.0 and student["tokens"] > 0
        assert r["metrics"]["teacher"]["perplexity"] < student["perplexity"] * 10
    assert results["flexkd"]["probe"]["probes"][0]["k"] == 32


def test_raw_rejects_mismatched_widths_with_one_clear_line(run_cli):
    run = run_cli("pair=tiny_encoder", "task=tiny_cls", "strategy=raw", check=False)
    assert run.returncode == 2
    assert "d_S=32" in run.stderr and "d_T=128" in run.stderr
    assert "strategy=projection" in run.stderr
    assert "Traceback" not in run.stderr + run.stdout


def test_raw_runs_on_equal_width_pair(run_cli):
    run = run_cli("pair=tiny_encoder_same", "task=tiny_cls", "strategy=raw")
    r = run.results()
    assert r["strategy"] == "raw" and r["params"]["strategy_extra_trainable"] == 0


def test_sweep_of_three_strategies_and_two_seeds(run_cli):
    run = run_cli("pair=tiny_encoder", "task=tiny_cls", "strategy=flexkd,projection,sft", "seed=0,1",
                  multirun=True)
    results = sweep_results(run.out_dir)
    assert len(results) == 6
    assert sorted((r["strategy"], r["seed"]) for r in results) == sorted(
        (s, seed) for s in ("flexkd", "projection", "sft") for seed in (0, 1))
    dirs = {r["paths"]["results"] for r in results}
    assert len(dirs) == 6


def test_standalone_eval_reproduces_the_training_runs_scores(run_cli, tmp_path):
    # with a chosen attention kernel, which the eval stage loads the saved student with again
    kernel = "+pair.student.attn_implementation=eager"
    trained = run_cli("pair=tiny_causal", "task=tiny_instruct", "strategy=logit_kd", "seed=1",
                      "eval.limit=16", kernel).results()
    assert trained["attention"] == {"teacher": "sdpa", "student": "eager"}
    assert "rougeL" in trained["metrics"]["student"] and "rougeL" in trained["metrics"]["teacher"]
    assert trained["samples"] and {"prompt", "reference", "student", "teacher"} <= set(trained["samples"][0])
    evaluated = run_cli("stage=eval", f"eval_model={trained['paths']['student']}",
                        "pair=tiny_causal", "task=tiny_instruct", "eval.limit=16", kernel, name="eval")
    assert evaluated.results()["stage"] == "eval"
    assert evaluated.results()["attention"] == {"student": "eager"}
    scores = evaluated.results()["metrics"]["student"]
    for key in ("perplexity", "rougeL", "rouge1", "perplexity_word"):
        assert scores[key] == pytest.approx(trained["metrics"]["student"][key], rel=1e-6), key
    # benchmarks.tables files the re-scoring under the training job (strategy, seed 1), and
    # with the same eval settings it is that job's own measurement again.
    (rescored,) = tables.load_runs([evaluated.out_dir])
    assert (rescored["strategy"], rescored["seed"]) == ("logit_kd", 1)
    job_dir = Path(trained["paths"]["student"]).parent
    assert Path(rescored["rescored_from"]).resolve() == job_dir.resolve()
    with pytest.raises(tables.DuplicateRunError):
        tables.summarise(tables.load_runs([evaluated.out_dir, job_dir]))


def test_classification_on_a_causal_pair_is_scored_as_multiple_choice(run_cli):
    r = run_cli("pair=tiny_causal", "task=tiny_cls", "strategy=flexkd", "eval.limit=64",
                "task.max_test_examples=64").results()
    student, teacher = r["metrics"]["student"], r["metrics"]["teacher"]
    # lm-eval's multiple-choice acc and the harness's own label-word accuracy score the same
    # thing (one-token label words), so they agree exactly.
    assert student["acc"] == pytest.approx(student["accuracy"])
    assert teacher["acc"] == pytest.approx(teacher["accuracy"])
    assert teacher["accuracy"] > 0.6, "the causal teacher did not learn the label words"
    assert r["eval_settings"]["lm_eval_version"]
    assert r["probe"]["probes"][0]["k"] == 32


def test_lightning_ddp_on_two_cpu_processes(run_cli):
    """Scaling uses Lightning's DDP: two gloo processes, each on its own shard of batches."""
    run = run_cli("pair=tiny_encoder", "task=tiny_cls", "strategy=projection",
                  "+trainer.strategy=ddp", "trainer.devices=2", "trainer.max_steps=4")
    r = run.results()
    assert r["train"]["steps"] == 4
    assert r["params"]["strategy_extra_trainable"] == 32 * 128 + 128
    assert json.loads((run.out_dir / "status.json").read_text())["status"] == "success"


CROSS_STRATEGIES = ["flexkd", "projection", "cka", "sft"]


def test_cross_tokenizer_pair_every_token_strategy(run_cli):
    """tiny_cross: a byte-level BPE teacher and a word-level student; feature strategies compare
    one pooled row per aligned character span, sft needs no alignment."""
    run = run_cli("pair=tiny_cross", "task=tiny_cls", f"strategy={','.join(CROSS_STRATEGIES)}",
                  multirun=True)
    results = {r["strategy"]: r for r in sweep_results(run.out_dir)}
    assert sorted(results) == sorted(CROSS_STRATEGIES)
    for r in results.values():
        assert 0.0 <= r["metrics"]["student"]["accuracy"] <= 1.0
        a = r["alignment"]
        # Every split example aligns without losing characters (offsets refer to the original
        # text through the student's lowercasing); the BPE teacher splits words into pieces.
        assert a["pool"] == "mean" and a["chars_dropped"] == 0 and a["examples"] > 0
        assert a["mean_group_size_student"] == 1.0 and a["mean_group_size_teacher"] > 1.0
        assert 0.0 < a["one_to_one_share"] < 1.0
    assert results["projection"]["params"]["strategy_extra_trainable"] == 32 * 128 + 128
    assert len(results["flexkd"]["probe"]["probes"][0]["selected"]) == 32


def test_unalignable_pair_fails_in_preflight_before_the_teacher_stage(run_cli, tmp_path):
    from flexkd.fixtures import fixture_path

    tok = tmp_path / "vowel_cut_tokenizer"
    shutil.copytree(fixture_path("tiny_tokenizer"), tok)
    spec = json.loads((tok / "tokenizer.json").read_text())
    spec["normalizer"] = {"type": "Sequence", "normalizers": [spec["normalizer"], {
        "type": "Replace", "pattern": {"Regex": "[aeiouAEIOU]\\w*"}, "content": ""}]}
    (tok / "tokenizer.json").write_text(json.dumps(spec))
    run = run_cli("pair=tiny_cross", "task=tiny_cls", "strategy=cka",
                  f"pair.teacher.tokenizer={tok}", check=False)
    assert run.returncode == 2, run.stderr[-2000:]
    lines = run.stderr.strip().splitlines()  # the error in one line, then the usual debug hint
    assert lines[0].startswith("flexkd: error: ") and lines[1:] == [
        "flexkd: (run with debug=true for the traceback)"]
    assert "tiny_cls/train.jsonl:1: teacher and student tokens cannot be aligned" in lines[0]
    assert "student tokens [" in lines[0] and "teacher tokens [" in lines[0]
    assert "stage teacher" not in run.stdout + run.stderr and "Traceback" not in run.stdout
