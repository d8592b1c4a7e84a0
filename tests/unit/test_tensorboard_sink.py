"""The TensorBoard sink, read back with TensorBoard's own reader: a resumed run's rolled-back
steps vanish, every step appears once with its newest value, and the hparams session is the last run's."""
import glob
import os

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

from hvd_trainer.monitor.tensorboard import TensorBoardSink, flatten

PARTS = ("step", "data", "compute", "exchange", "optimizer", "other", "eval")


def _record(step: int, v: float) -> dict:
    """An epoch row whose every figure is derived from ``v``, so a value names the run that wrote it."""
    ranks = [{"rank": r, "host": f"node{r}", "steps": 10, **{f"{p}_s": v / 1000 for p in PARTS},
              "rss_mb": v, "peak_rss_mb": v + 1, "cpu_util": v / 100, "gpu_mb": None, "gpu_peak_mb": None}
             for r in (0, 1)]
    return {"epoch": step // 10, "step": step, "train_loss": v, "lr": v / 10, "test_loss": v + 0.5,
            "test_accuracy": v / 100, "samples_per_sec": v * 10, "elapsed_s": 1.0,
            "time": {f"{p}_s": v / 1000 for p in PARTS}, "ranks": ranks, "stragglers": []}


def _read(path: str) -> EventAccumulator:
    acc = EventAccumulator(path, size_guidance={"scalars": 0, "tensors": 0})  # purge_orphaned_data=True
    acc.Reload()
    return acc


@pytest.fixture
def resumed_log(tmp_path):
    """Run 1 reaches step 30 and closes; run 2 resumes from the checkpoint at step 20."""
    log_dir = str(tmp_path / "tensorboard")
    first = TensorBoardSink(log_dir, resume_step=0)
    for step in (10, 20, 30):
        if step == 30:
            first.step(25, 9.0, 0.9)
            first.step(30, 9.0, 0.9)
        first.epoch(_record(step, float(step)))
    first.close({"final_test_accuracy": 0.3, "final_test_loss": 1.0, "samples_per_sec": 5.0},
                {"optim": {"lr": 0.1, "milestones": [1, 2]}, "epochs": 3})
    second = TensorBoardSink(log_dir, resume_step=20)
    for step in (30, 40):
        second.step(step, 7.0, 0.7)
        second.epoch(_record(step, step + 100.0))
    second.close({"final_test_accuracy": 0.9, "final_test_loss": 0.2, "samples_per_sec": 50.0},
                 {"optim": {"lr": 0.2, "milestones": [1, 2]}, "epochs": 4, "data": {"root": None}})
    return log_dir


def test_a_resumed_run_replaces_the_rolled_back_steps(resumed_log):
    acc = _read(resumed_log)
    tags = acc.Tags()["scalars"]
    expected = {"train/loss", "test/loss", "test/accuracy", "lr", "throughput/samples_per_sec",
                *(f"time/{p}_ms" for p in PARTS), *(f"time/rank{r}/{p}_ms" for r in (0, 1) for p in PARTS),
                *(f"memory/rank{r}/{k}" for r in (0, 1) for k in ("rss_mb", "peak_rss_mb")),
                "cpu/rank0/util", "cpu/rank1/util", "train/step_loss"}
    assert set(tags) == expected  # no gpu tags: null on CPU
    for tag in expected - {"train/step_loss"}:
        assert [e.step for e in acc.Scalars(tag)] == [10, 20, 30, 40], tag
    # run 1's per-step values at 25 and 30 are gone; run 2's remain
    assert [(e.step, e.value) for e in acc.Scalars("train/step_loss")] == [(30, 7.0), (40, 7.0)]
    assert [e.value for e in acc.Scalars("lr")] == pytest.approx([1.0, 2.0, 0.7, 0.7])  # step() wrote 30, 40
    assert [e.value for e in acc.Scalars("train/loss")] == [10.0, 20.0, 130.0, 140.0]
    assert [e.value for e in acc.Scalars("time/rank1/data_ms")] == pytest.approx([10.0, 20.0, 130.0, 140.0])
    assert acc.Scalars("memory/rank0/peak_rss_mb")[2].value == 131.0


def test_hparams_hold_the_last_runs_flattened_config_and_final_metrics(resumed_log):
    hp_dir = os.path.join(resumed_log, "hparams")
    assert len(glob.glob(os.path.join(hp_dir, "events.out.tfevents.*"))) == 1  # run 1's session deleted
    acc = _read(hp_dir)
    content = acc.PluginTagToContent("hparams")
    assert {"_hparams_/experiment", "_hparams_/session_start_info", "_hparams_/session_end_info"} <= set(content)
    start = HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["optim.lr"].number_value == 0.2 and start.hparams["epochs"].number_value == 4
    assert start.hparams["optim.milestones"].string_value == "[1, 2]"
    assert start.hparams["data.root"].string_value == "None"
    assert [(e.step, e.value) for e in acc.Scalars("hparam/final_test_accuracy")] == [(40, pytest.approx(0.9))]
    assert acc.Scalars("hparam/samples_per_sec")[0].value == 50.0


def test_an_early_stop_falls_back_to_the_last_epoch(tmp_path):
    sink = TensorBoardSink(str(tmp_path), resume_step=0)
    sink.epoch(_record(10, 10.0))
    sink.close({}, {})
    acc = _read(str(tmp_path / "hparams"))
    assert acc.Scalars("hparam/final_test_loss")[0].value == 10.5
    assert acc.Scalars("hparam/samples_per_sec")[0].step == 10


def test_a_restart_from_scratch_hides_the_whole_earlier_attempt(tmp_path):
    for step, v in ((30, 1.0), (20, 2.0)):  # the first attempt got further than the second
        sink = TensorBoardSink(str(tmp_path), resume_step=0)
        sink.epoch(_record(step, v))
        sink.close({}, {})
    assert [(e.step, e.value) for e in _read(str(tmp_path)).Scalars("train/loss")] == [(20, 2.0)]


def test_flatten_makes_dotted_keys_and_strings_of_the_rest():
    assert flatten({"a": {"b": {"c": 1}}, "d": True, "e": (1, 2), "f": 0.5}) == \
        {"a.b.c": 1, "d": True, "e": "(1, 2)", "f": 0.5}
