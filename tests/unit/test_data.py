import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from hvd_trainer.config import ConfigError, load_config
from hvd_trainer.data import ShardedBatches, build_splits, eval_batches, eval_slice


@pytest.mark.parametrize("n,size", [(10, 3), (359, 2), (2, 4), (7, 7)])
def test_eval_slices_cover_every_sample_once(n, size):
    seen = [i for r in range(size) for i in eval_slice(n, r, size)]
    assert seen == list(range(n))


def _dataset(n):
    return TensorDataset(torch.arange(n, dtype=torch.float32)[:, None], torch.arange(n))


def test_shards_of_two_ranks_interleave_to_one_rank_batches():
    ds = _dataset(64)
    one = ShardedBatches(ds, 8, 0, 1, seed=3)
    two = [ShardedBatches(ds, 4, r, 2, seed=3) for r in range(2)]
    for epoch in range(2):
        for big, a, b in zip(one.epoch(epoch), two[0].epoch(epoch), two[1].epoch(epoch)):
            assert sorted(big[1].tolist()) == sorted(a[1].tolist() + b[1].tolist())


def test_uneven_shards_have_equal_step_counts_and_skip_resumes_position():
    ds = _dataset(23)
    shards = [ShardedBatches(ds, 4, r, 3, seed=0) for r in range(3)]
    assert len({len(s) for s in shards}) == 1
    full = list(shards[1].epoch(5))
    assert [b[1].tolist() for b in shards[1].epoch(5, skip=1)] == [b[1].tolist() for b in full[1:]]
    assert list(shards[1].epoch(6))[0][1].tolist() != full[0][1].tolist()  # reshuffled per epoch


def test_eval_batches_unpadded():
    ds = _dataset(11)
    got = [int(v) for r in range(3) for _, y in eval_batches(ds, 2, r, 3) for v in y]
    assert got == list(range(11))


def test_digits_split_is_deterministic():
    a = build_splits(load_config(None).data, seed=1)
    b = build_splits(load_config(None).data, seed=1)
    assert a.input_shape == (1, 8, 8) and a.num_classes == 10
    assert len(a.train) + len(a.test) == 1797
    assert torch.equal(a.test.tensors[0], b.test.tensors[0])


def test_npz_data(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.random.rand(50, 4).astype(np.float32), y=np.arange(50) % 3)
    splits = build_splits(load_config(None, ["data.name=npz", f"data.path={path}"]).data, seed=0)
    assert splits.input_shape == (4,) and splits.num_classes == 3 and len(splits.test) == 10
    np.savez(path, a=np.zeros(3))
    with pytest.raises(ConfigError, match="data.path"):
        build_splits(load_config(None, ["data.name=npz", f"data.path={path}"]).data, seed=0)
