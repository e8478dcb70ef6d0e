"""W&B logging (`logger=wandb`): offline runs, one per multirun job, read back from the .wandb file.

wandb 0.31 writes no files/wandb-summary.json or files/config.yaml for offline runs: everything is in
<run dir>/run-<id>.wandb, a LevelDB-style log of `wandb.proto` Record messages. `read_offline_run`
replays it (wandb no longer ships a Python reader: wandb.sdk.internal.datastore is gone).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from flexkd import loggers
from flexkd.errors import ConfigError

META = {"pair": "tiny_encoder", "task": "tiny_cls", "strategy": "flexkd", "seed": 3}


@pytest.fixture
def wandb_env(monkeypatch, tmp_path):
    """Offline W&B with its staging/cache dirs in tmp_path (not ~/.local/share/wandb)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    for var, sub in (("WANDB_DATA_DIR", "data"), ("WANDB_CACHE_DIR", "cache"),
                     ("WANDB_CONFIG_DIR", "config")):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / sub))
    monkeypatch.setenv("WANDB_SILENT", "true")


# ----------------------------------------------------------------------------- .wandb reader

_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def wandb_records(path: Path):
    """The Record protos of a .wandb file (7-byte ':W&B' header, then LevelDB log blocks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero-filled tail of a block
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        buf = chunk if kind in (_FULL, _FIRST) else buf + chunk
        if kind in (_FULL, _LAST):
            record = pb.Record()
            record.ParseFromString(buf)
            yield record


def _set(tree: dict, item) -> None:
    keys = list(item.nested_key) or [item.key]
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = json.loads(item.value_json)


def read_offline_run(run_dir: Path) -> dict:
    """{'run': RunRecord, 'config': {...}, 'summary': {...}, 'artifacts': [ArtifactRecord]}."""
    (log_file,) = run_dir.glob("run-*.wandb")
    run, config, summary, artifacts = None, {}, {}, []
    for record in wandb_records(log_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            for item in run.config.update:
                _set(config, item)
        elif kind == "config":
            for item in record.config.update:
                _set(config, item)
        elif kind == "summary":
            for item in record.summary.update:
                _set(summary, item)
        elif kind == "artifact":
            artifacts.append(record.artifact)
    assert run is not None, f"no run record in {log_file}"
    return {"run": run, "config": config, "summary": summary, "artifacts": artifacts}


# ----------------------------------------------------------------------------- end to end

@pytest.mark.slow
def test_multirun_writes_one_offline_run_per_job(run_cli, wandb_env):
    run = run_cli("logger=wandb", "pair=tiny_encoder", "task=tiny_cls", "strategy=flexkd,sft",
                  multirun=True)
    run_dirs = sorted(run.out_dir.glob("*/wandb/offline-run-*"))
    assert len(run_dirs) == 2, run_dirs
    assert run.stdout.count("wandb sync ") >= 2 and "is offline at" in run.stdout

    runs = {}
    for run_dir in run_dirs:
        job_dir = run_dir.parents[1]
        results = json.loads((job_dir / "results.json").read_text())
        assert f"wandb sync {run_dir.resolve()}" in run.stdout
        runs[results["strategy"]] = (read_offline_run(run_dir), results)
    assert sorted(runs) == ["flexkd", "sft"]

    groups = {r["run"].run_group for r, _ in runs.values()}
    assert len(groups) == 1 and groups != {""}, groups
    assert groups == {"out"}  # the sweep dir (tmp_path/out), relative to the launch cwd
    assert len({r["run"].run_id for r, _ in runs.values()}) == 2

    for strategy, (wb, results) in runs.items():
        assert wb["run"].display_name == f"{strategy}-tiny_encoder-tiny_cls-s0"
        assert wb["run"].project == "flexkd"
        assert list(wb["run"].tags) == ["pair:tiny_encoder", "task:tiny_cls",
                                        f"strategy:{strategy}", "seed:0"]
        assert wb["config"]["strategy"]["name"] == strategy
        assert wb["config"]["logger"]["name"] == "wandb"
        summary = wb["summary"]
        assert summary["test/student/accuracy"] == results["metrics"]["student"]["accuracy"]
        assert summary["test/teacher/accuracy"] == results["metrics"]["teacher"]["accuracy"]
        assert (summary["validation/student/accuracy"]
                == results["metrics"]["validation"]["student"]["accuracy"])
        assert summary["params/student"] == results["params"]["student"]
        assert summary["time/distill"] == results["timings"]["distill"]

    flexkd_summary = runs["flexkd"][0]["summary"]
    probe = runs["flexkd"][1]["probe"]["probes"][0]
    hist = flexkd_summary["probe/spectrum_hist"]
    assert hist["_type"] == "histogram" and sum(hist["values"]) == len(probe["spectrum"])
    assert flexkd_summary["probe/effective_dim_0.9"] == probe["effective_dims"]["0.9"]
    assert flexkd_summary["probe/stability_overlap"] == probe["stability_overlap"]
    assert flexkd_summary["probe/spectrum_table"]["_type"] == "table-file"
    assert not any(k.startswith("probe/") for k in runs["sft"][0]["summary"])


def test_samples_table_and_model_artifact_in_process(wandb_env, tmp_path):
    """finish_loggers: samples table (missing keys tolerated), student artifact, run finished."""
    import wandb

    cfg = OmegaConf.create({"seed": 3, "logger": {
        "name": "wandb", "project": "flexkd-test", "entity": None, "group": "g1", "tags": ["x"],
        "mode": None, "log_model": True, "save_dir": None, "job_type": "distill"}})
    out = tmp_path / "job"
    student = out / "student"
    student.mkdir(parents=True)
    (student / "config.json").write_text("{}")
    built = loggers.build_loggers(cfg, out, META)
    assert [type(lg).__name__ for lg in built] == ["CSVLogger", "WandbLogger"]
    run_dir = Path(built[1].experiment.settings.sync_dir)
    results = {"metrics": {"student": {"accuracy": 0.5}, "teacher": {"accuracy": 0.75},
                           "validation": {"student": {"accuracy": 0.25}}},
               "probe": {}, "params": {"student": 10}, "timings": {"distill": 1.5}, **META}
    samples = [{"prompt": "p1", "reference": "r1", "student": "s1", "teacher": "t1"},
               {"prompt": "p2", "student": "s2"}]
    loggers.finish_loggers(built, results, samples=samples, student_dir=student)
    assert wandb.run is None, "finish_loggers must close the W&B run"
    # run.finish() returns before wandb-core has flushed the .wandb file (it may still hold only
    # its 7-byte header); shutting the service down waits for it.
    wandb.teardown()

    wb = read_offline_run(run_dir)
    assert wb["run"].run_group == "g1" and list(wb["run"].tags)[-1] == "x"
    assert wb["summary"]["test/student/accuracy"] == 0.5
    assert wb["summary"]["validation/student/accuracy"] == 0.25
    assert wb["summary"]["eval/samples"]["_type"] == "table-file"
    assert wb["summary"]["eval/samples"]["nrows"] == 2
    models = [a for a in wb["artifacts"] if a.type == "model"]
    assert len(models) == 1 and models[0].name == "student-flexkd-tiny_encoder-tiny_cls-s3"
    assert [c.path for c in models[0].manifest.contents] == ["config.json"]


# ----------------------------------------------------------------------------- pure helpers

def test_run_name_and_tags():
    assert loggers.run_name(META) == "flexkd-tiny_encoder-tiny_cls-s3"
    assert loggers.run_tags(META, ["ablation", "pair:tiny_encoder"]) == [
        "pair:tiny_encoder", "task:tiny_cls", "strategy:flexkd", "seed:3", "ablation"]
    assert loggers.run_tags(META, None)[-1] == "seed:3"


def test_group_is_the_sweep_dir_for_multirun_and_the_run_dir_otherwise(tmp_path):
    sweep = "multirun/2026-11-28/08-54-22"
    job = tmp_path / sweep / "0"
    assert loggers.default_group(job, "RunMode.MULTIRUN", sweep, str(tmp_path)) == sweep
    assert loggers.default_group(job, "MULTIRUN", str(tmp_path / sweep), str(tmp_path)) == sweep
    # Jobs of one sweep share the group; the job subdir does not leak into it.
    other = tmp_path / sweep / "1"
    assert (loggers.default_group(other, "RunMode.MULTIRUN", sweep, str(tmp_path))
            == loggers.default_group(job, "RunMode.MULTIRUN", sweep, str(tmp_path)))
    single = tmp_path / "outputs/2026-11-28/08-54-22"
    assert loggers.default_group(single, "RunMode.RUN", sweep, str(tmp_path)) == \
        "outputs/2026-11-28/08-54-22"
    assert loggers.default_group(Path("/elsewhere/x"), None, None, str(tmp_path)) == "/elsewhere/x"
    assert len(loggers.group_name("/a" * 200)) == 128


def test_mode_resolution():
    assert loggers.resolve_mode("disabled", {"WANDB_MODE": "online"}) == "disabled"
    assert loggers.resolve_mode(None, {"WANDB_MODE": "dryrun"}, logged_in=True) == "offline"
    assert loggers.resolve_mode(None, {}, logged_in=True) == "online"
    assert loggers.resolve_mode(None, {}, logged_in=False) == "offline"
    assert loggers.resolve_mode(None, {"WANDB_API_KEY": "k" * 40, "HOME": "/nonexistent"}) == "online"
    with pytest.raises(ConfigError, match="online, offline, disabled, shared"):
        loggers.resolve_mode("sometimes", {})


def test_summary_flattening_and_sample_rows():
    results = {"metrics": {"student": {"accuracy": 0.5, "per_class": [1, 2]},
                           "teacher": {"accuracy": 0.9},
                           "validation": {"student": {"accuracy": 0.4}, "teacher": {}}},
               "params": {"student": 7}, "timings": {"probe": 0.5},
               "probe": {"probes": [{"effective_dims": {"0.9": 4}, "stability_overlap": 0.75,
                                     "spectrum": [3.0, 1.0]}]}}
    summary = loggers.summary_metrics(results)
    assert summary == {"test/student/accuracy": 0.5, "test/teacher/accuracy": 0.9,
                       "validation/student/accuracy": 0.4, "params/student": 7,
                       "time/probe": 0.5, "probe/effective_dim_0.9": 4,
                       "probe/stability_overlap": 0.75}
    two = {"probe": {"probes": [{"effective_dims": {"0.9": 1}}, {"effective_dims": {"0.9": 2}}]}}
    assert loggers.summary_metrics(two) == {"probe/0/effective_dim_0.9": 1,
                                            "probe/1/effective_dim_0.9": 2}
    columns, rows = loggers.sample_rows([{"prompt": "p", "student": "s", "extra": 1}])
    assert columns == ["prompt", "reference", "student", "teacher"]
    assert rows == [["p", "", "s", ""]]


def test_unknown_logger_name_is_a_config_error(tmp_path):
    cfg = OmegaConf.create({"logger": {"name": "tensorboard"}})
    with pytest.raises(ConfigError) as err:
        loggers.build_loggers(cfg, tmp_path, META)
    assert "tensorboard" in str(err.value) and "csv, wandb" in str(err.value)
    assert [type(lg).__name__ for lg in loggers.build_loggers(
        OmegaConf.create({"logger": {"name": "csv"}}), tmp_path, META)] == ["CSVLogger"]
