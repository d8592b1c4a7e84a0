"""data.bad_samples: an image that cannot be decoded stops the job with one line naming it
(``error``), or is left out of its batch and reported once (``skip``), with and without loader
worker processes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from hvd_trainer.config import ConfigError, load_config
from hvd_trainer.data import bad_sample_report, eval_loader, make_batches
from hvd_trainer.data.datasets import ImageFolder, write_image_folder
from hvd_trainer.data.validation import BadSample

N = 12


def _folder(root: Path, bad: dict[int, bytes]) -> tuple[ImageFolder, list[str]]:
    """N distinct 8x8 images in 3 classes, the files at positions ``bad`` overwritten."""
    write_image_folder(str(root), np.random.default_rng(0).random((N, 3, 8, 8)), np.arange(N) % 3)
    ds = ImageFolder(str(root))
    paths = [ds.samples[i][0] for i in bad]
    for i, blob in bad.items():
        Path(ds.samples[i][0]).write_bytes(blob)
    return ds, paths


GARBAGE = b"this is not a png at all"


@pytest.fixture
def one_bad(tmp_path):
    return _folder(tmp_path / "images", {5: GARBAGE})


def _cfg(ds, workers: int, mode: str, *extra: str):
    return load_config(None, ["data.name=images", f"data.path={ds.root}", f"data.num_workers={workers}",
                              f"data.bad_samples={mode}", *extra]).data


def _key(x: torch.Tensor) -> bytes:
    return x.numpy().tobytes()


@pytest.mark.parametrize("workers", [0, 2])
def test_error_names_the_file_in_one_line(one_bad, workers):
    ds, (bad,) = one_bad
    batches = make_batches(ds, 4, 0, 1, 0, _cfg(ds, workers, "error"))
    try:
        with pytest.raises(ConfigError) as caught:
            list(batches.epoch(0))
    finally:
        batches.close()
    assert isinstance(caught.value, BadSample) and caught.value.path == bad
    assert str(caught.value) == f"data.path: cannot decode {bad}: cannot identify image file"


def test_a_truncated_file_is_a_bad_sample_too(tmp_path):
    ds, _ = _folder(tmp_path / "images", {})
    path = ds.samples[3][0]
    blob = Path(path).read_bytes()
    Path(path).write_bytes(blob[:len(blob) // 2])
    with pytest.raises(BadSample, match=f"^data.path: cannot decode {path}: "):
        ds[3]


@pytest.mark.parametrize("workers", [0, 2])
def test_skip_yields_every_good_sample_once_and_reports_the_bad_one_once(one_bad, workers):
    ds, (bad,) = one_bad
    good = sorted(_key(ds[i][0]) for i in range(N) if ds.samples[i][0] != bad)
    batches = make_batches(ds, 4, 0, 1, 0, _cfg(ds, workers, "skip"))
    try:
        for epoch in range(2):
            got = list(batches.epoch(epoch))
            assert len(got) == len(batches) == 3
            assert sorted(len(y) for _, y in got) == [3, 4, 4]  # the bad sample's batch is shorter
            assert sorted(_key(x) for xs, _ in got for x in xs) == good
        assert batches.bad_samples() == [bad]
    finally:
        batches.close()


@pytest.mark.parametrize("workers", [0, 2])
def test_a_batch_of_only_bad_samples_comes_out_empty(tmp_path, workers):
    ds, paths = _folder(tmp_path / "images", {4: GARBAGE, 5: GARBAGE, 6: GARBAGE, 7: GARBAGE})
    batches = make_batches(ds, 4, 0, 1, 0, _cfg(ds, workers, "skip", "data.shuffle=false"))
    try:
        got = list(batches.epoch(0))
    finally:
        batches.close()
    assert [len(y) for _, y in got] == [4, 0, 4]  # still one batch per step: the ranks stay in step
    assert got[1][0].shape == (0, 3, 8, 8) and got[1][1].dtype == torch.long
    assert batches.bad_samples() == paths


def test_evaluation_skips_or_stops_the_same_way(one_bad):
    ds, (bad,) = one_bad
    skipping = eval_loader(ds, 5, 0, 1, _cfg(ds, 0, "skip"), torch.device("cpu"), 0)
    for _ in range(2):
        assert sum(len(y) for _, y in skipping) == N - 1
    assert skipping.bad_samples() == [bad]
    stopping = eval_loader(ds, 5, 0, 1, _cfg(ds, 2, "error"), torch.device("cpu"), 0)
    try:
        with pytest.raises(BadSample, match="cannot identify image file"):
            list(stopping)
    finally:
        stopping.close()


def test_the_shape_comes_from_the_first_image_that_decodes(tmp_path):
    ds, _ = _folder(tmp_path / "images", {0: GARBAGE})
    assert ds.input_shape == (3, 8, 8)


def test_in_memory_tensors_never_skip():
    tensors = TensorDataset(torch.zeros(8, 1), torch.zeros(8, dtype=torch.long))
    cfg = load_config(None, ["data.bad_samples=skip"]).data
    assert make_batches(tensors, 4, 0, 1, 0, cfg).bad_samples() == []


def test_the_report_counts_every_distinct_path_and_lists_the_first_20_sorted():
    per_rank = [[f"/d/{i:03d}.png" for i in range(30, 0, -1)], ["/d/001.png", "/d/100.png"], []]
    report = bad_sample_report(per_rank)
    assert report["count"] == 31
    assert report["paths"] == [f"/d/{i:03d}.png" for i in range(1, 21)]
    assert bad_sample_report([[], []]) == {"count": 0, "paths": []}
