import os
import pickle

import pytest
import torch

import io

from hvd_trainer.checkpoint import FORMAT, SCHEMA, Checkpointer, load, seal, validate


def _sealed(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return seal(buf.getvalue())


def _payload(step):
    return {"format": FORMAT, "model": {"w": torch.full((3,), float(step))}, "optimizer": {}, "scheduler": {},
            "step": step, "epoch": 0, "batch_in_epoch": step, "epoch_offset": 0, "rng": [], "config": {}, "world_size": 1,
            "strategy": "horovod", "precision": {"name": "fp32", "scaler": {}}}


def test_save_keeps_newest_k_and_leaves_no_temp_files(tmp_path):
    ck = Checkpointer(tmp_path, keep=2)
    for step in (1, 2, 3):
        ck.save(_payload(step))
    assert [p.name for p in ck.list()] == ["ckpt-step000000003.pt", "ckpt-step000000002.pt"]
    assert sorted(os.listdir(tmp_path)) == ["ckpt-step000000002.pt", "ckpt-step000000003.pt"]


def test_torn_or_incomplete_newest_is_skipped(tmp_path):
    ck = Checkpointer(tmp_path, keep=5)
    ck.save(_payload(1))
    ck.save(_payload(2))
    newest = ck.path_for(2)
    newest.write_bytes(newest.read_bytes()[:100])  # torn write
    found = ck.find()
    assert found.path == ck.path_for(1) and not found.unusable
    assert found.skipped[0][0] == str(newest) and "checksum mismatch" in found.skipped[0][1]
    ck.path_for(3).write_bytes(_sealed({"model": {}}))  # loads, but lacks the required keys
    found = ck.find()
    assert found.path == ck.path_for(1)
    assert [p for p, _ in found.skipped] == [str(ck.path_for(3)), str(newest)]
    assert "missing format, optimizer" in found.skipped[0][1]


def test_only_unusable_checkpoints_are_reported_as_such(tmp_path):
    ck = Checkpointer(tmp_path)
    assert not ck.find().unusable  # nothing there: a fresh start is right
    ck.save(_payload(4))
    ck.path_for(4).write_bytes(b"garbage")
    found = ck.find()
    assert found.unusable and found.data is None


def test_schema_validation_names_the_problem():
    assert validate(_payload(1)) is None
    assert validate([1]) == "not a mapping but list"
    assert validate({**_payload(1), "step": "7"}) == "step is str, expected int"
    assert validate({**_payload(1), "format": 99}).startswith("format 99")
    with pytest.raises(ValueError, match="invalid checkpoint"):
        Checkpointer("/nonexistent").save({"step": 1})
    assert set(_payload(1)) == set(SCHEMA)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_loading_is_weights_only(tmp_path):
    path = tmp_path / "ckpt-step000000009.pt"
    path.write_bytes(_sealed({**_payload(9), "extra": _Evil()}))
    with pytest.raises(pickle.UnpicklingError):
        load(path)
    found = Checkpointer(tmp_path).find()
    assert found.unusable and "UnpicklingError" in found.skipped[0][1]


def test_rng_round_trip_through_a_weights_only_checkpoint(tmp_path):
    from hvd_trainer.runtime import rng
    import random
    import numpy as np

    torch.manual_seed(1); np.random.seed(2); random.seed(3)
    state = rng.capture()
    ck = Checkpointer(tmp_path)
    ck.save({**_payload(1), "rng": [state]})
    expected = (torch.rand(3), np.random.rand(3), random.random())
    rng.restore(load(ck.find().path)["rng"][0])
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1]) and random.random() == expected[2]


def test_summary_and_metrics_stay_valid_json_and_a_resume_forgets_later_rows(tmp_path):
    import json
    import math

    from hvd_trainer.output import Output

    out = Output(str(tmp_path), rank=0, progress=False, log_every_rank=False)
    for step in (10, 20, 30):
        out.metrics({"step": step, "train_loss": math.nan if step == 30 else 1.0})
    out.forget_metrics_after(20)
    out.metrics({"step": 30, "train_loss": 0.5})
    out.summary({"final_train_loss": math.nan, "lr": math.inf, "nested": [math.nan, 1.0]})
    out.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["train_loss"]) for r in rows] == [(10, 1.0), (20, 1.0), (30, 0.5)]
    text = (tmp_path / "summary.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"final_train_loss": None, "lr": None, "nested": [None, 1.0]}


def test_flipped_bytes_fail_the_checksum_and_the_previous_checkpoint_is_used(tmp_path):
    ck = Checkpointer(tmp_path, keep=5)
    ck.save(_payload(1))
    ck.save({**_payload(2), "model": {"w": torch.arange(100_000, dtype=torch.float32)}})
    blob = bytearray(ck.path_for(2).read_bytes())
    middle = len(blob) // 2
    blob[middle:middle + 16] = bytes(b ^ 0xFF for b in blob[middle:middle + 16])  # inside the tensor
    ck.path_for(2).write_bytes(bytes(blob))
    found = ck.find()
    assert found.path == ck.path_for(1)
    assert found.skipped == [(str(ck.path_for(2)), found.skipped[0][1])] and "checksum mismatch" in found.skipped[0][1]
    import pytest as _pytest
    from hvd_trainer.checkpoint import ChecksumError
    with _pytest.raises(ChecksumError):
        load(ck.path_for(2))
