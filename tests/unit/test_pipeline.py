"""The per-rank input pipeline (one process): exact resume with workers and random
augmentation, per-sample seeding, sharding like the tensor fast path, worker lifetime."""
import os

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

from hvd_trainer.config import load_config
from hvd_trainer.data.sharding import ShardedBatches
from hvd_trainer.data.datasets import build_images, write_image_folder
from hvd_trainer.data.loaders import LoaderBatches, make_batches


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    write_image_folder(str(root), rng.random((70, 3, 8, 8)), np.arange(70) % 3)
    return root


def _cfg(root, workers, *extra):
    return load_config(None, ["data.name=images", f"data.path={root}", "data.augment=crop_flip",
                              f"data.num_workers={workers}", *extra]).data


def _epochs(batches, epochs, skip_at=None):
    out = []
    for e in range(epochs):
        skip = skip_at[1] if skip_at and skip_at[0] == e else 0
        out.append([tuple(t.clone() for t in b) for b in batches.epoch(e, skip=skip)])
    return out


def _same(a, b):
    return len(a) == len(b) and all(all(torch.equal(x, y) for x, y in zip(p, q)) for p, q in zip(a, b))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_gives_the_same_batches(images, workers):
    cfg = _cfg(images, workers)
    train, _ = build_images(cfg, seed=0)
    for rank in range(2):
        straight = LoaderBatches(train, 4, rank, 2, seed=3, cfg=cfg)
        full = _epochs(straight, 2)
        straight.close()
        # a new process resumes at epoch 1, batch 3: the same samples and the same augmentation
        resumed = LoaderBatches(train, 4, rank, 2, seed=3, cfg=cfg)
        assert _same([tuple(t.clone() for t in b) for b in resumed.epoch(1, skip=3)], full[1][3:])
        resumed.close()


def test_augmentation_is_random_but_the_same_at_any_worker_count(images):
    cfg0, cfg2 = _cfg(images, 0), _cfg(images, 2, "data.shuffle=false")
    train, _ = build_images(cfg0, seed=0)
    zero = _epochs(LoaderBatches(train, 8, 0, 1, 5, _cfg(images, 0, "data.shuffle=false")), 2)
    two = LoaderBatches(train, 8, 0, 1, 5, cfg2)
    assert all(_same(a, b) for a, b in zip(zero, _epochs(two, 2)))
    two.close()
    # the same images in the same order, augmented differently in the next epoch
    assert torch.equal(zero[0][0][1], zero[1][0][1]) and not torch.equal(zero[0][0][0], zero[1][0][0])


def test_workers_leave_the_training_processs_random_streams_alone(images):
    train, _ = build_images(_cfg(images, 0), seed=0)
    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(1)
    list(LoaderBatches(train, 8, 0, 1, 0, _cfg(images, 0)).epoch(0))
    assert torch.equal(torch.rand(3), expected)


class Generic(Dataset):
    """Not a TensorDataset: goes through the loader; records which process fetched each item."""

    def __init__(self, n):
        self.x, self.y = torch.arange(n, dtype=torch.float32)[:, None], torch.arange(n)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return torch.cat([self.x[i], torch.tensor([float(os.getpid())])]), self.y[i]


def test_loader_shards_like_the_tensor_fast_path_and_keeps_its_workers():
    cfg = load_config(None, ["data.num_workers=2"]).data
    tensors = TensorDataset(torch.arange(23, dtype=torch.float32)[:, None], torch.arange(23))
    for rank in range(3):
        fast = ShardedBatches(tensors, 4, rank, 3, seed=1)
        loader = make_batches(Generic(23), 4, rank, 3, 1, cfg)
        pids = set()
        for epoch in range(2):
            got = list(loader.epoch(epoch))
            assert [b[1].tolist() for b in got] == [b[1].tolist() for b in fast.epoch(epoch)]
            pids |= {int(p) for b in got for p in b[0][:, 1]}
        assert len(pids) == 2 and os.getpid() not in pids  # the same two workers both epochs
        loader.close()
        assert loader.loader._iterator is None


def test_in_memory_tensors_keep_the_fast_path():
    tensors = TensorDataset(torch.zeros(8, 1), torch.zeros(8, dtype=torch.long))
    assert isinstance(make_batches(tensors, 4, 0, 1, 0, load_config(None).data), ShardedBatches)


class _Squares(Dataset):
    def __len__(self):
        return 6

    def __getitem__(self, i):
        return torch.tensor([float(i * i)])


def test_workers_start_from_a_forkserver_unless_the_data_set_cannot_get_there(monkeypatch):
    """forkserver by default (fork would copy a rank with MPI's and Horovod's threads running);
    a data set that does not pickle, or that names the launching script's own classes, falls
    back to fork with a warning that says why and what to do."""
    import sys
    import warnings

    from hvd_trainer.data.workers import worker_context

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert worker_context("forkserver", _Squares()).get_start_method() == "forkserver"
        assert worker_context("fork", _Squares()).get_start_method() == "fork"
    unpicklable = TensorDataset(torch.zeros(2))
    unpicklable.transform = lambda x: x
    with pytest.warns(RuntimeWarning, match=r"data.worker_start=forkserver: .*cannot be pickled.*worker_start=fork"):
        assert worker_context("forkserver", unpicklable).get_start_method() == "fork"

    class InScript(_Squares):
        pass
    InScript.__module__, InScript.__qualname__ = "__main__", "InScript"
    monkeypatch.setattr(sys.modules["__main__"], "InScript", InScript, raising=False)
    with pytest.warns(RuntimeWarning, match=r"launching script \(__main__\)"):
        assert worker_context("spawn", InScript()).get_start_method() == "fork"


def test_forkserver_workers_do_not_run_the_launching_script_again(tmp_path):
    """A training script without an ``if __name__ == "__main__"`` guard: its loader workers
    (forkserver, the default) must not execute it again, and it runs once."""
    import subprocess
    import sys

    script = tmp_path / "train_script.py"
    marks = tmp_path / "marks"
    script.write_text(
        "import os, torch\n"
        f"open({str(marks)!r}, 'a').write(f'{{os.getpid()}}\\n')\n"
        "from torch.utils.data import Dataset\n"
        "from hvd_trainer.config import load_config\n"
        "from hvd_trainer.data.loaders import LoaderBatches\n"
        "from tests_pipeline_squares import Squares\n"
        "cfg = load_config(None, ['data.num_workers=2']).data\n"
        "b = LoaderBatches(Squares(), 2, 0, 1, 0, cfg)\n"
        "print(sorted(float(x) for batch in b.epoch(0) for x in batch[0].flatten()))\n"
        "b.close()\n")
    (tmp_path / "tests_pipeline_squares.py").write_text(
        "import torch\nfrom torch.utils.data import Dataset\n"
        "class Squares(Dataset):\n    def __len__(self):\n        return 6\n"
        "    def __getitem__(self, i):\n        return torch.tensor([float(i * i)])\n")
    res = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip() == "[0.0, 1.0, 4.0, 9.0, 16.0, 25.0]", res.stdout
    assert len(marks.read_text().split()) == 1, "the script ran again in a worker"
