import os
import pickle

import pytest
import torch

from hvd_trainer.checkpoint import Checkpointer, load


def _payload(step):
    return {"model": {"w": torch.full((3,), float(step))}, "optimizer": {}, "scheduler": {}, "step": step,
            "epoch": 0, "batch_in_epoch": step, "rng": [], "config": {}}


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
    path, data = ck.newest_valid()
    assert path == ck.path_for(1)
    torch.save({"model": {}}, ck.path_for(3))  # loads, but lacks the required keys
    assert ck.newest_valid()[0] == ck.path_for(1)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_loading_is_weights_only(tmp_path):
    path = tmp_path / "ckpt-step000000009.pt"
    torch.save({**_payload(9), "extra": _Evil()}, path)
    with pytest.raises(pickle.UnpicklingError):
        load(path)
    assert Checkpointer(tmp_path).newest_valid() is None


def test_rng_round_trip_through_a_weights_only_checkpoint(tmp_path):
    from hvd_trainer import rng
    import random
    import numpy as np

    torch.manual_seed(1); np.random.seed(2); random.seed(3)
    state = rng.capture()
    ck = Checkpointer(tmp_path)
    ck.save({**_payload(1), "rng": [state]})
    expected = (torch.rand(3), np.random.rand(3), random.random())
    rng.restore(ck.newest_valid() and load(ck.path_for(1))["rng"][0])
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1]) and random.random() == expected[2]
