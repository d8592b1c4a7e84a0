"""Shard globs read in part by each rank (files opened are counted), uneven shards, image folders."""
import builtins

import numpy as np
import pytest
import torch

from hvd_trainer.config import ConfigError, load_config
from hvd_trainer.data.datasets import ImageFolder, NpzShards, build_images, write_image_folder, write_npz_shards
from hvd_trainer.data.loaders import make_batches
from hvd_trainer.data.sharding import assign_shards


def _shards(tmp_path, sizes, features=5):
    rng = np.random.default_rng(0)
    n = sum(sizes)
    x, y = rng.random((n, features)).astype(np.float32), np.arange(n) % 4
    write_npz_shards(str(tmp_path / "train"), x, y, sizes)
    return str(tmp_path / "train-*.npz"), x, y


def _bind_all(pattern, size, uneven="pad"):
    """Every rank's open_part, then agree, as bind does over a real allgather."""
    sets = [NpzShards(pattern, uneven) for _ in range(size)]
    parts = [ds.open_part(rank, size) for rank, ds in enumerate(sets)]
    for ds in sets:
        ds.agree(parts)
    return sets


def test_each_rank_opens_only_its_own_shards(tmp_path, monkeypatch):
    pattern, x, _ = _shards(tmp_path, [10, 10, 10, 10, 10, 10])
    opened = []
    real_open = builtins.open

    def counting_open(file, *args, **kwargs):
        if str(file).endswith(".npz"):
            opened.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)
    per_rank = []
    for rank in range(3):
        opened.clear()
        NpzShards(pattern).open_part(rank, 3)
        per_rank.append(sorted(opened))
    assert [len(p) for p in per_rank] == [2, 2, 2]  # 2 of the 6 files each, nothing else read
    assert sorted(sum(per_rank, [])) == sorted(str(p) for p in tmp_path.glob("train-*.npz"))


def test_uneven_shards_give_every_rank_the_same_steps_from_its_own_samples(tmp_path):
    pattern, x, _ = _shards(tmp_path, [5, 40, 12, 3])
    cfg = load_config(None).data
    for uneven, expect in (("pad", 40), ("truncate", 20)):
        sets = _bind_all(pattern, 2, uneven)
        assert [len(ds) for ds in sets] == [40, 20] and {ds.epoch_samples for ds in sets} == {expect}
        assert {ds.global_len for ds in sets} == {60}
        for ds in sets:
            batches = make_batches(ds, 8, sets.index(ds), 2, 0, cfg)
            got = torch.cat([b[0] for b in batches.epoch(1)])
            assert len(batches) == -(-expect // 8) and len(got) == expect
            own = {tuple(r) for r in ds.tensors[0].tolist()}
            assert {tuple(r) for r in got.tolist()} <= own  # padding repeats this rank's samples
            if uneven == "pad" and len(ds) < expect:
                assert len({tuple(r) for r in got.tolist()}) == len(ds)  # all of them, then repeats


def test_shards_are_dealt_by_size(tmp_path):
    _shards(tmp_path, [50, 10, 10, 10, 10, 10], features=200)  # bytes ~ samples
    files = sorted(str(p) for p in tmp_path.glob("train-*.npz"))
    parts = assign_shards(files, 2)
    assert parts[0] == [files[0]] and len(parts[1]) == 5


def test_too_few_or_bad_shards_are_one_line_errors_on_every_rank(tmp_path):
    pattern, _, _ = _shards(tmp_path, [5, 5])
    with pytest.raises(ConfigError, match="data.path: 2 shard"):
        NpzShards(pattern).bind(0, 3, lambda part: [part] * 3)
    np.savez(tmp_path / "train-00001.npz", x=np.zeros((5, 5)), y=np.full(5, -1))
    sets = [NpzShards(pattern) for _ in range(2)]
    parts = [ds.open_part(r, 2) for r, ds in enumerate(sets)]
    for ds in sets:  # one rank's shard is bad: both ranks raise the same line, naming it
        with pytest.raises(ConfigError, match=r"data.path: .*train-00001.npz: x/y: labels must be >= 0.*\(rank \d\)"):
            ds.agree(parts)


def test_shard_config_needs_matching_globs(tmp_path):
    with pytest.raises(ConfigError, match="data.test_path: data.name=shards needs"):
        load_config(None, ["data.name=shards", f"data.path={_shards(tmp_path, [3])[0]}"])
    with pytest.raises(ConfigError, match="data.path: no file matches"):
        load_config(None, ["data.name=shards", f"data.path={tmp_path}/none-*.npz", "data.test_path=x"])


def test_image_folder(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.random((12, 3, 6, 5))
    write_image_folder(str(tmp_path / "a"), x, np.arange(12) % 3)
    write_image_folder(str(tmp_path / "a"), x[:3], np.arange(3) % 3, suffix=".jpg")
    ds = ImageFolder(str(tmp_path / "a"))
    assert len(ds) == 15 and ds.num_classes == 3 and ds.input_shape == (3, 6, 5)
    xi, yi = ds[[s for s, _ in ds.samples].index(str(tmp_path / "a/class000/000000.png"))]
    assert yi == 0 and torch.allclose(xi, torch.as_tensor(x[0], dtype=torch.float32), atol=1 / 255)
    grey = ImageFolder(str(tmp_path / "a"), mode="L", size=[4, 4])
    assert grey.input_shape == (1, 4, 4)
    cfg = load_config(None, ["data.name=images", f"data.path={tmp_path / 'a'}", "data.test_fraction=0.2"]).data
    tr, te = build_images(cfg, seed=0)
    tr2, te2 = build_images(cfg, seed=0)
    assert len(te) == 3 and te.samples == te2.samples and not set(te.samples) & set(tr.samples)
    with pytest.raises(ConfigError, match="data.path: no .png"):
        ImageFolder(str(tmp_path))
