"""A user's own strategy, outside the package: a module on PYTHONPATH and a YAML in a
directory added with `hydra.searchpath`. No file under flexkd/ is edited, and it is validated,
logged and tabulated like the built-in ones."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]

DOC = ROOT / "docs" / "adding_a_strategy.md"


def doc_block(language: str) -> str:
    """The first ```<language> block of docs/adding_a_strategy.md: the test runs the doc's example."""
    return DOC.read_text().split(f"```{language}\n", 1)[1].split("```", 1)[0]


@pytest.fixture
def plugin(tmp_path):
    code, conf = tmp_path / "code", tmp_path / "conf"
    (conf / "strategy").mkdir(parents=True)
    code.mkdir()
    (code / "mirror_strategy.py").write_text(doc_block("python"))
    (conf / "strategy" / "mine.yaml").write_text(doc_block("yaml"))
    return {"args": (f"hydra.searchpath=[file://{conf}]", "strategy=mine", "pair=tiny_encoder",
                     "task=tiny_cls", "teacher_finetune.enabled=false"),
            "env": {"PYTHONPATH": str(code)}}


def test_own_strategy_runs_logs_and_tabulates(run_cli, plugin):
    run = run_cli(*plugin["args"], "strategy.scale=2.0", "trainer.log_every_n_steps=1",
                  env=plugin["env"])
    results = run.results()
    assert results["strategy"] == "mine"
    assert results["variant"] == {"strategy": "mine", "settings": {"scale": 2.0},
                                  "label": "mine[scale=2.0]"}
    with open(run.out_dir / "logs" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    mirror = [float(r["train/mirror"]) for r in rows if r.get("train/mirror")]
    assert mirror and all(v > 0 for v in mirror)
    tables = subprocess.run([sys.executable, "-m", "benchmarks.tables", str(run.out_dir)],
                            capture_output=True, text=True, cwd=ROOT, check=True)
    rows = [line for line in tables.stdout.splitlines() if line.startswith("| ")]
    assert any(cell.strip().startswith("mine") for row in rows for cell in row.split("|")), tables.stdout


def test_own_knob_out_of_range_is_rejected_before_any_model_loads(run_cli, plugin):
    run = run_cli(*plugin["args"], "strategy.scale=50", env=plugin["env"], check=False)
    assert run.returncode == 2, run.stderr[-3000:]
    errors = [line for line in run.stderr.splitlines() if line.startswith("flexkd: error:")]
    assert errors == ["flexkd: error: strategy.scale=50 is out of range: it must be <= 10 "
                      "(the factor on the teacher's features)"]
    assert "stage teacher" not in run.stdout + run.stderr and "Traceback" not in run.stderr
    # Rejected in validation: no stage after it ran, nothing trained or logged.
    assert "stage assets" in run.stdout + run.stderr
    assert not (run.out_dir / "logs").exists() and not (run.out_dir / "checkpoints").exists()
