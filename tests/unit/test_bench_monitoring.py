"""hvd-bench's monitoring-overhead section without MPI: the variants' overrides, the wall
throughput read back, the sinks' files checked, the ratios per round, and its report."""
import json

import pytest

from benchmarks import core, monitoring
from benchmarks.core import BenchError


def test_on_adds_tensorboard_and_the_textfile_and_off_neither():
    off, on = monitoring.overrides("off", "/t/m.prom"), monitoring.overrides("on", "/t/m.prom")
    assert "strategy=horovod" in off and "strategy=horovod" in on
    assert "runtime.tensorboard=false" in off and not any("metrics" in o for o in off)
    assert "runtime.tensorboard=true" in on and "runtime.metrics_textfile=/t/m.prom" in on
    assert not any("metrics_port" in o for o in on)  # no port is opened
    assert monitoring.rounds(core.QUICK) == 5 and monitoring.count(core.QUICK) == 10


def test_wall_throughput_is_samples_between_rows_over_wall_time_after_the_warm_up(tmp_path):
    rows = [{"epoch": 1, "samples_seen": 100, "elapsed_s": 3.0}, {"epoch": 2, "samples_seen": 200, "elapsed_s": 4.0},
            {"epoch": 3, "samples_seen": 300, "elapsed_s": 4.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert monitoring.wall_throughputs(str(tmp_path)) == [100.0, 200.0]


def test_a_job_that_did_not_run_its_sinks_as_asked_is_an_error(tmp_path):
    prom = tmp_path / "m.prom"
    monitoring.check_sinks("off", str(tmp_path), str(prom))
    with pytest.raises(BenchError, match="TensorBoard"):
        monitoring.check_sinks("on", str(tmp_path), str(prom))
    (tmp_path / "tensorboard").mkdir()
    (tmp_path / "tensorboard" / "events.out.tfevents.1.vm.1.0").write_bytes(b"x")
    with pytest.raises(BenchError, match="textfile"):
        monitoring.check_sinks("on", str(tmp_path), str(prom))
    prom.write_text("x 1\n")
    monitoring.check_sinks("on", str(tmp_path), str(prom))
    with pytest.raises(BenchError, match="off"):
        monitoring.check_sinks("off", str(tmp_path), str(prom))


def _result():
    figures = {"off": {"wall": [[100.0, 102.0], [90.0, 92.0], [100.0, 100.0]], "train": [[110.0], [100.0], [105.0]]},
               "on": {"wall": [[99.0, 99.0], [92.0, 92.0], [95.0, 97.0]], "train": [[110.0], [99.0], [105.0]]}}
    t = {"step_s": 0.1, "other_s": 0.0002}
    times = {"off": [t, t, t], "on": [dict(t, other_s=0.0003)] * 3}
    return monitoring.summarize(figures, times, steps=15, blocks=2)


def test_the_ratio_is_on_over_off_per_round_then_the_median_over_rounds():
    res = _result()
    assert res["rounds"] == 3
    assert res["ratios"]["wall"]["values"] == pytest.approx([99 / 101, 92 / 91, 96 / 100])
    assert res["ratio"] == pytest.approx(99 / 101) == res["ratios"]["wall"]["median"]
    assert res["ratios"]["wall"]["min"] == pytest.approx(0.96) and res["ratios"]["wall"]["max"] == pytest.approx(92 / 91)
    assert res["variants"]["off"]["wall"]["n"] == 6  # every timed epoch of every round
    assert res["variants"]["on"]["time"]["other_s"] == pytest.approx(0.0003)


def test_the_report_shows_both_figures_the_breakdown_and_the_target():
    text = monitoring.markdown(_result(), None)
    assert "| samples/s, wall (with epoch ends) | 100.0 [90.0..102.0] | 96.0 [92.0..99.0] | **0.980 [0.960..1.011]** |" in text
    assert "| other ms per step (where the sinks' step() lands) | 0.200 | 0.300 | +0.100 ms |" in text
    assert "**0.980** (target >= 0.98: met)" in text
