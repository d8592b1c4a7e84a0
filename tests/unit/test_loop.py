"""The loop's own behaviour in one process (strategy=single, no MPI): stopping at max_steps,
the checkpoint policy, exact resume, the non-finite guard, a stop signal, and unusable
checkpoints. What needs several ranks stays in tests/parallel."""
from __future__ import annotations

import json

import pytest
import torch

from hvd_trainer import load_config
from hvd_trainer.checkpoint import Checkpointer, load
from hvd_trainer.config import ConfigError
from hvd_trainer.runner import train
from hvd_trainer.runtime.control import ControlPlane, StopSignals
from hvd_trainer.runtime.errors import EXIT_PREEMPTED, NonFiniteError, Preempted
from hvd_trainer.strategies import make_strategy
from hvd_trainer.strategies.base import unwrap
from hvd_trainer.trainer import Trainer

# 1,438 training samples at batch 32: 45 steps an epoch (the last one short)
BASE = ["strategy=single", "data.name=digits", "model.name=mlp", "model.hidden=[32]", "optim.name=sgd",
        "optim.lr=0.05", "optim.momentum=0.9", "batch_size=32", "epochs=2", "runtime.progress=false",
        "checkpoint.every_epochs=0"]
STEPS_PER_EPOCH = 45


def _cfg(tmp_path, *extra):
    return load_config(None, BASE + [f"run_dir={tmp_path}", *extra])


def _run(tmp_path, *extra, loss_fn=None):
    """Train; returns (summary, final weights)."""
    out = {}
    summary = train(_cfg(tmp_path, *extra), loss_fn=loss_fn,
                    on_end=lambda t: out.update(w={k: v.clone() for k, v in unwrap(t.state.model).state_dict().items()}))
    return summary, out["w"]


def _steps(tmp_path):
    return [int(p.name[len("ckpt-step"):-3]) for p in sorted((tmp_path / "checkpoints").glob("ckpt-step*.pt"))]


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_max_steps_stops_there_with_a_checkpoint_and_resume_continues_exactly(tmp_path, capsys):
    straight, w_straight = _run(tmp_path / "straight")
    assert straight["steps"] == 2 * STEPS_PER_EPOCH and straight["resumed_from_step"] is None

    stopped, _ = _run(tmp_path / "cut", "max_steps=30")
    assert stopped["steps"] == 30 and stopped["epochs"] == 0
    assert _steps(tmp_path / "cut") == [30]
    resumed, w_resumed = _run(tmp_path / "cut")
    assert resumed["resumed_from_step"] == 30, "the second run did not start from the checkpoint"
    assert "at step 30 (epoch 0, batch 30)" in capsys.readouterr().out
    assert resumed["steps"] == straight["steps"]
    _same(w_resumed, w_straight)


def test_checkpoint_policy_every_steps_every_epochs_keep_and_the_end(tmp_path):
    _run(tmp_path / "a", "checkpoint.every_steps=20", "checkpoint.keep=10")
    assert _steps(tmp_path / "a") == [20, 40, 60, 80, 90]  # the trained model is always kept
    _run(tmp_path / "b", "checkpoint.every_steps=20", "checkpoint.keep=2")
    assert _steps(tmp_path / "b") == [80, 90]
    _run(tmp_path / "c", "checkpoint.every_epochs=1", "checkpoint.keep=10")
    assert _steps(tmp_path / "c") == [45, 90]
    payload = load(tmp_path / "c" / "checkpoints" / "ckpt-step000000045.pt")
    assert (payload["step"], payload["epoch"], payload["batch_in_epoch"]) == (45, 1, 0)


def _nan_at(calls_to_poison):
    calls = {"n": 0}

    def loss(logits, y):
        calls["n"] += 1
        out = torch.nn.functional.cross_entropy(logits, y)
        return out * float("nan") if calls["n"] in calls_to_poison else out
    return loss


def test_skipped_steps_leave_the_weights_finite_and_are_counted(tmp_path):
    summary, w = _run(tmp_path, "optim.nonfinite=skip", "optim.max_skipped_steps=3", loss_fn=_nan_at({5, 9}))
    assert summary["skipped_steps"] == 2 and summary["steps"] == 2 * STEPS_PER_EPOCH
    assert all(bool(torch.isfinite(t).all()) for t in w.values())


def test_skips_beyond_the_limit_stop_naming_the_step_and_the_last_good_checkpoint(tmp_path):
    with pytest.raises(NonFiniteError, match=r"step 12: .*2 skipped steps, more than optim.max_skipped_steps=1"
                                             r".*last good checkpoint is .*ckpt-step000000010.pt"):
        _run(tmp_path, "optim.nonfinite=skip", "optim.max_skipped_steps=1", "checkpoint.every_steps=10",
             loss_fn=_nan_at({3, 12}))


def test_stop_policy_names_the_step(tmp_path):
    with pytest.raises(NonFiniteError, match=r"step 7: non-finite gradient .*optim.nonfinite=stop; no checkpoint"):
        _run(tmp_path, "optim.nonfinite=stop", loss_fn=_nan_at({7}))


class StopAt(ControlPlane):
    """A stop signal that arrives before step ``at`` ends."""

    def __init__(self, at: int) -> None:
        super().__init__(StopSignals(()))
        self.at = at

    def step_boundary(self, step: int) -> bool:
        return step >= self.at


def test_a_stop_signal_checkpoints_at_the_step_and_exits_75(tmp_path):
    cfg = _cfg(tmp_path)
    strategy = make_strategy(cfg)
    strategy.init()
    trainer = Trainer(cfg, strategy, control=StopAt(17))
    with pytest.raises(Preempted) as stop:
        trainer.fit()
    trainer.close()
    assert stop.value.code == EXIT_PREEMPTED and "at step 17" in stop.value.message
    assert _steps(tmp_path) == [17]


def test_unusable_checkpoints_are_reported_and_stop_the_run(tmp_path, capsys):
    _run(tmp_path, "max_steps=5")
    (path,) = (tmp_path / "checkpoints").glob("ckpt-step*.pt")
    blob = bytearray(path.read_bytes())
    blob[-100] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(ConfigError, match="no usable checkpoint"):
        _run(tmp_path)
    assert f"skipped checkpoint {path}" in capsys.readouterr().out


def test_accumulation_of_k_micro_batches_equals_one_big_batch(tmp_path):
    _, accumulated = _run(tmp_path / "acc", "batch_size=8", "optim.accumulation_steps=4", "max_steps=40")
    _, big = _run(tmp_path / "big", "batch_size=32", "max_steps=40")
    for k in big:
        torch.testing.assert_close(accumulated[k], big[k], rtol=0, atol=1e-5)


def test_same_seed_same_weights_and_another_seed_differs(tmp_path):
    _, a = _run(tmp_path / "a", "model.dropout=0.1", "seed=7", "max_steps=20")
    _, b = _run(tmp_path / "b", "model.dropout=0.1", "seed=7", "max_steps=20")
    _, c = _run(tmp_path / "c", "model.dropout=0.1", "seed=8", "max_steps=20")
    _same(a, b)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_summary_json_is_what_train_returns(tmp_path):
    summary, _ = _run(tmp_path, "max_steps=3")
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["steps"] == summary["steps"] == 3 and on_disk["strategy"] == "single"


def test_single_refuses_a_launcher_with_several_ranks(tmp_path, monkeypatch):
    monkeypatch.setenv("HOROVOD_SIZE", "2")
    with pytest.raises(ConfigError, match="strategy: single runs one process, this job has 2"):
        _run(tmp_path)


def test_a_huge_lr_stops_instead_of_training_on_nan(tmp_path):
    with pytest.raises(NonFiniteError, match="non-finite gradient"):
        _run(tmp_path, "optim.lr=1000000.0", "model.hidden=[128,64]", "batch_size=16")
    assert not (tmp_path / "summary.json").exists()
    assert not list(tmp_path.glob("checkpoints/*.pt"))  # nothing non-finite was written


def test_a_damaged_newest_checkpoint_is_skipped_and_the_run_resumes_from_the_one_before(tmp_path, capsys):
    _run(tmp_path, "checkpoint.every_epochs=1")
    older, newest = sorted((tmp_path / "checkpoints").glob("ckpt-step*.pt"))
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated
    capsys.readouterr()
    summary, _ = _run(tmp_path, "checkpoint.every_epochs=1", "epochs=3")
    out = capsys.readouterr().out
    assert f"skipped checkpoint {newest}: checksum mismatch" in out and f"resumed from {older}" in out
    assert summary["resumed_from_step"] == STEPS_PER_EPOCH
    # the abandoned run's epoch 2 row is gone: every step appears once
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]


def test_with_no_usable_checkpoint_the_files_are_left_as_they_were(tmp_path):
    _run(tmp_path, "checkpoint.every_epochs=1")
    for p in (tmp_path / "checkpoints").glob("ckpt-step*.pt"):
        p.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=r"^checkpoint.resume: no usable checkpoint in .* \(2 skipped"):
        _run(tmp_path, "epochs=3")
    assert all(p.read_bytes() == b"not a checkpoint" for p in (tmp_path / "checkpoints").glob("*.pt"))
