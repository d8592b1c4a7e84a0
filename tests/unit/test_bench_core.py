"""What the benchmark scripts share through ``benchmarks.core``, without MPI: the per-epoch
throughputs read back from a trainer run, and the standalone pipeline script's report (medians
with their spread, ratios of medians) and its run-as-a-file entry point."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import core, pipeline

REPO = Path(__file__).resolve().parents[2]


def test_epoch_throughputs_drop_the_warm_up_epoch(tmp_path):
    rows = [{"epoch": e, "epoch_samples_per_sec": 100.0 * e, "test_accuracy": 0.5} for e in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert core.epoch_throughputs(str(tmp_path)) == [200.0, 300.0]


def test_pipeline_report_shows_medians_spreads_and_ratios_of_medians(tmp_path, capsys):
    results = {"np1 memory": [90.0, 100.0, 120.0], "np1 png/workers=2": [80.0, 95.0, 99.0],
               "np1 png/workers=0": [40.0, 50.0, 60.0]}
    ratios = {"np1 png/workers=2 vs memory": ("np1 png/workers=2", "np1 memory"),
              "np1 png/workers=0 vs memory": ("np1 png/workers=0", "np1 memory")}
    out = pipeline.report("title", results, ratios, {"np1 png/workers=2 vs memory": 0.9}, str(tmp_path / "r.json"))
    assert out == {"np1 png/workers=2 vs memory": pytest.approx(0.95), "np1 png/workers=0 vs memory": 0.5}
    text = capsys.readouterr().out
    assert "np1 memory" in text and "100.0   (90.0 .. 120.0)" in text
    assert "0.950   target >= 0.90: met" in text
    written = json.loads((tmp_path / "r.json").read_text())
    assert written["summary"]["np1 memory"]["median"] == 100.0
    assert written["summary"]["np1 memory"]["values"] == results["np1 memory"]
    assert written["ratios"]["np1 png/workers=0 vs memory"] == 0.5


def test_pipeline_runs_as_a_file_as_its_docstring_says():
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "pipeline.py"), "--help"],
                         capture_output=True, text=True, timeout=120, cwd="/")
    assert res.returncode == 0, res.stderr
    assert "loader workers" in res.stdout
