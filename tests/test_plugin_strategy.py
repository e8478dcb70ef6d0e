"""A user's own strategy, outside the package: a module on PYTHONPATH and a YAML in a
directory added with `hydra.searchpath`. No file under flexkd/ is edited, and it is validated,
logged and tabulated like the built-in ones."""

import csv
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]

MODULE = '''
"""Mirror: the student's first d dims should equal `scale` x the teacher's first d dims."""
from pydantic import Field

from flexkd.strategies.base import FeatureWeight, Strategy, paired_tokens


class Mirror(Strategy):
    name = "mine"

    class Knobs(Strategy.Knobs):
        beta: FeatureWeight = 1.0
        scale: float = Field(1.0, gt=0, le=10, description="the factor on the teacher's features")

    @property
    def uses_features(self):
        return True

    def feature_losses(self, batch, teacher, student):
        s, t = paired_tokens(batch, teacher, student, self.resolved_pairs[0])
        d = min(s.shape[1], t.shape[1])
        return {"mirror": ((s[:, :d] - self.scale * t[:, :d]) ** 2).mean()}
'''

YAML = """
# A strategy of one's own: the class by _target_, the knobs it shows at their defaults.
_target_: mirror_strategy.Mirror
name: mine
beta: 1.0
scale: 1.0
"""


@pytest.fixture
def plugin(tmp_path):
    code, conf = tmp_path / "code", tmp_path / "conf"
    (conf / "strategy").mkdir(parents=True)
    code.mkdir()
    (code / "mirror_strategy.py").write_text(textwrap.dedent(MODULE))
    (conf / "strategy" / "mine.yaml").write_text(YAML)
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
    assert "| tiny_encoder | tiny_cls | mine |" in tables.stdout


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
