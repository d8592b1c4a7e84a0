import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from hvd_trainer.config import ConfigError, load_config
from hvd_trainer.data.sharding import ShardedBatches, eval_batches, eval_slice
from hvd_trainer.data.sources import build_splits


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
    assert len(one) == len(two[0]) == len(two[1]) == 8
    for epoch in range(2):
        # strict: a rank with a batch more or fewer fails here instead of being cut off
        for big, a, b in zip(one.epoch(epoch), two[0].epoch(epoch), two[1].epoch(epoch), strict=True):
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


@pytest.mark.parametrize("arrays,message", [
    ({"x": np.zeros((5, 3)), "y": np.zeros(4, dtype=np.int64)}, "x has 5 samples but y has 4"),
    ({"x": np.zeros((5, 3)), "y": np.array([0, 1, -1, 0, 1])}, "labels must be >= 0"),
    ({"x": np.zeros((0, 3)), "y": np.zeros(0, dtype=np.int64)}, "no samples"),
    ({"x": np.zeros(5), "y": np.zeros(5, dtype=np.int64)}, "x must be numeric with shape"),
    ({"x": np.zeros((5, 3)), "y": np.array(["a"] * 5)}, "y must be a 1-D array of integer"),
    ({"x": np.zeros((5, 3)), "y": np.zeros((5, 2), dtype=np.int64)}, "y must be a 1-D array of integer"),
    ({"x": np.zeros((5, 3)), "y": np.array([0.0, 1.5, 0, 1, 0])}, "y must be a 1-D array of integer"),
    ({"x": np.array([[0.0, np.nan]] * 5), "y": np.zeros(5, dtype=np.int64)}, "5 samples hold NaN"),
    ({"z": np.zeros(3)}, "needs arrays"),
])
def test_bad_npz_contents_are_one_line_config_errors(tmp_path, arrays, message):
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)
    cfg = load_config(None, ["data.name=npz", f"data.path={path}"])
    with pytest.raises(ConfigError, match=message):
        build_splits(cfg.data, 0)


def test_whole_float_labels_are_accepted(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.random.default_rng(0).random((10, 3)), y=np.array([0.0, 1.0] * 5))
    splits = build_splits(load_config(None, ["data.name=npz", f"data.path={path}"]).data, 0)
    assert splits.num_classes == 2


def test_digits_read_without_sklearn_equal_sklearns_load_digits():
    """The digits arrays come from scikit-learn's CSV, read without importing scikit-learn:
    exactly what ``load_digits`` gives, scaled to [0, 1], in (N, 1, 8, 8)."""
    import subprocess
    import sys

    from sklearn.datasets import load_digits

    from hvd_trainer.data.sources import load_digits_arrays

    x, y = load_digits_arrays()
    bunch = load_digits()
    assert x.shape == (1797, 1, 8, 8) and x.dtype == np.float32 and y.dtype == np.int64
    np.testing.assert_array_equal(x, (bunch.images / 16.0).astype(np.float32)[:, None])
    np.testing.assert_array_equal(y, bunch.target)
    # and scikit-learn stays unimported in a process that loads them
    code = "import sys; from hvd_trainer.data.sources import load_digits_arrays; load_digits_arrays(); print('sklearn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stdout + out.stderr
