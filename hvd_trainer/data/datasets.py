"""Data sets users have: a glob of .npz shards read in part by each rank, and an image folder;
and writers of both (test data, benchmarks).

:class:`NpzShards` (``data.name: shards``) is *rank-local*: each rank opens only its own shards (the
files are dealt out by size, see :func:`~hvd_trainer.data.sharding.assign_shards`) and holds only
those samples. Shards of unequal size would give ranks
unequal step counts, and the rank with more steps would wait forever in a collective the others
never enter; so the ranks agree on their counts once (one small ``allgather``) and every rank
runs the same number of samples per epoch: the smaller ranks repeat some of their own samples
(``data.uneven_shards: pad``, as ``DistributedSampler`` pads) or every rank stops at the
smallest count (``truncate``).

:class:`ImageFolder` (``data.name: images``) is ``root/<class>/<image>.png|jpg|jpeg``: every rank
lists the same files (listing opens none), the sampler shards the indices, and each image is
decoded (Pillow) and augmented in the loader's worker processes. ``transform`` (Python API) gets
the decoded ``float32`` tensor (C, H, W) in [0, 1] and returns the sample; its random draws are
seeded per sample by the pipeline (:mod:`hvd_trainer.data.loaders`). A file that cannot be
decoded raises :class:`~hvd_trainer.data.validation.BadSample`, which the loader turns into a
one-line error or a skipped sample (``data.bad_samples``).

Both are map-style ``Dataset`` objects; the Python API still takes any ``Dataset``.
"""
from __future__ import annotations

import glob as globlib
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from ..config import ConfigError
from .sharding import Allgather, assign_shards
from .validation import BadSample, check_arrays

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class NpzShards(TensorDataset):
    """This rank's shards of a glob of .npz files (arrays ``x`` and ``y``), in memory.

    Build with the pattern only; :meth:`bind` (every training rank, collective) opens this
    rank's shards and agrees on the counts. ``key`` names the config key in errors.
    """

    rank_local = True

    def __init__(self, pattern: str, uneven: str = "pad", key: str = "data.path") -> None:
        super().__init__(torch.zeros(0, 1), torch.zeros(0, dtype=torch.long))
        self.pattern, self.uneven, self.key = pattern, uneven, key
        self.files: list[str] = []
        self.opened: list[str] = []   # the files this rank opened
        self.epoch_samples = 0        # samples per epoch on every rank (agreed)
        self.global_len = 0           # samples over all ranks (without padding)
        self.input_shape: tuple[int, ...] = ()
        self.num_classes = 0
        self.opened_by_rank: list[list[str]] = []

    def open_part(self, rank: int, size: int) -> dict[str, Any]:
        """Open this rank's shards (no communication); what the ranks must agree on."""
        files = sorted(globlib.glob(self.pattern))
        if len(files) < size:
            raise ConfigError(f"{self.key}: {len(files)} shard(s) match {self.pattern} for {size} ranks; "
                              f"every rank needs at least one")
        self.files = assign_shards(files, size)[rank]
        xs, ys, error = [], [], ""
        for path in self.files:
            self.opened.append(path)
            try:
                with np.load(path, allow_pickle=False) as arrays:
                    x, y = arrays["x"], arrays["y"]
                check_arrays(x, y, f"{path}: x/y")
            except ConfigError as err:
                error = f"{self.key}: {str(err).split(': ', 1)[1]}"
                break
            except Exception as err:  # noqa: BLE001 - unreadable, not an npz, no x or y
                error = f"{self.key}: cannot read {path} as an .npz with x and y ({type(err).__name__}: {err})"
                break
            xs.append(np.ascontiguousarray(x, dtype=np.float32))
            ys.append(np.asarray(y, dtype=np.int64))
        if error:
            return {"error": error, "n": 0, "shape": None, "classes": 0, "files": self.opened}
        self.tensors = (torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys)))
        return {"error": "", "n": len(self.tensors[1]), "shape": list(self.tensors[0].shape[1:]),
                "classes": int(self.tensors[1].max()) + 1, "files": self.opened}

    def agree(self, parts: Sequence[dict[str, Any]]) -> None:
        """Every rank, with every rank's :meth:`open_part` result: the same verdict everywhere."""
        for rank, part in enumerate(parts):
            if part["error"]:
                raise ConfigError(f"{part['error']} (rank {rank})" if len(parts) > 1 else part["error"])
        shapes = {tuple(p["shape"]) for p in parts}
        if len(shapes) > 1:
            raise ConfigError(f"{self.key}: shards hold samples of different shapes {sorted(shapes)}")
        counts = [p["n"] for p in parts]
        self.epoch_samples = max(counts) if self.uneven == "pad" else min(counts)
        self.global_len = sum(counts)
        self.input_shape = tuple(parts[0]["shape"])
        self.num_classes = max(p["classes"] for p in parts)
        self.opened_by_rank = [p["files"] for p in parts]

    def bind(self, rank: int, size: int, allgather: Allgather) -> "NpzShards":
        """Collective over the training ranks: open this rank's shards, agree with the others."""
        try:
            part = self.open_part(rank, size)
        except ConfigError as err:  # the glob sees too few files: every rank says so alike
            part = {"error": str(err), "n": 0, "shape": None, "classes": 0, "files": []}
        self.agree(allgather(part))
        return self


class CropFlip:
    """Random crop of the image padded by ``pad`` pixels, and a horizontal flip half the time
    (the usual CIFAR augmentation), drawing from torch's generator (seeded per sample)."""

    def __init__(self, pad: int = 4) -> None:
        self.pad = pad

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        p = self.pad
        _, h, w = x.shape
        padded = torch.nn.functional.pad(x, (p, p, p, p))
        i, j = (int(v) for v in torch.randint(0, 2 * p + 1, (2,)))
        out = padded[:, i:i + h, j:j + w]
        return out.flip(-1) if bool(torch.rand(()) < 0.5) else out


def decode_image(path: str, mode: str = "RGB", size: Optional[Sequence[int]] = None) -> torch.Tensor:
    """One PNG/JPEG file as a float32 tensor (C, H, W) in [0, 1]."""
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert(mode)
        if size is not None:
            img = img.resize((int(size[1]), int(size[0])), Image.BILINEAR)
        arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.transpose(2, 0, 1).copy()).float().div_(255.0)


class ImageFolder(Dataset):
    """``root/<class>/<file>.png|jpg|jpeg``; classes in sorted folder order.

    ``transform(x) -> x`` runs on the decoded tensor in the loader's workers (Python API);
    ``samples``/``classes`` may be given to make a view (a train/test split) without listing.
    A file that cannot be decoded raises :class:`BadSample` naming ``key`` and the file.
    """

    def __init__(self, root: str, transform: Optional[Callable] = None, mode: str = "RGB",
                 size: Optional[Sequence[int]] = None, samples: Optional[list[tuple[str, int]]] = None,
                 classes: Optional[list[str]] = None, key: str = "data.path") -> None:
        self.root, self.transform, self.mode, self.key = str(root), transform, mode, key
        self.size = list(size) if size is not None else None
        if samples is None:
            classes, samples = list_images(root, key)
        self.classes, self.samples = list(classes), samples

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of the first sample that decodes (unreadable files are the loader's to judge)."""
        first_error: Optional[BadSample] = None
        for i in range(len(self)):
            try:
                return tuple(self[i][0].shape)
            except BadSample as err:
                first_error = first_error or err
        raise first_error or ConfigError(f"{self.key}: no images")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        try:
            x = decode_image(path, self.mode, self.size)
        except Exception as err:  # noqa: BLE001 - corrupt, truncated, gone: the file is the cause
            raise BadSample.of(self.key, path, err) from None
        return (self.transform(x) if self.transform is not None else x), label

    def split(self, fraction: float, seed: int, train_transform: Optional[Callable] = None) -> tuple["ImageFolder", "ImageFolder"]:
        """(train, test) views: a seeded ``fraction`` of the files held out, the same on every rank."""
        order = np.random.default_rng(seed).permutation(len(self.samples))
        n_test = max(1, int(round(len(order) * fraction)))
        pick = lambda idx: [self.samples[i] for i in sorted(idx)]  # noqa: E731
        make = lambda s, t: ImageFolder(self.root, t, self.mode, self.size, s, self.classes, self.key)  # noqa: E731
        return make(pick(order[n_test:]), train_transform), make(pick(order[:n_test]), None)


def list_images(root: str, key: str = "data.path") -> tuple[list[str], list[tuple[str, int]]]:
    """(class names, [(file, label)]) of an image folder, in sorted order; files are not opened."""
    base = Path(root)
    classes = sorted(d.name for d in base.iterdir() if d.is_dir()) if base.is_dir() else []
    samples = [(str(f), label) for label, c in enumerate(classes) for f in sorted((base / c).iterdir())
               if f.suffix.lower() in IMAGE_SUFFIXES]
    if not samples:
        raise ConfigError(f"{key}: no .png/.jpg/.jpeg files in class subfolders of {root}")
    return classes, samples


def build_images(cfg, seed: int):
    """(train, test) image folders for ``data.name: images``."""
    augment = CropFlip() if cfg.augment == "crop_flip" else None
    full = ImageFolder(cfg.path, None, cfg.image_mode, cfg.image_size)
    if cfg.test_path:
        test = ImageFolder(cfg.test_path, None, cfg.image_mode, cfg.image_size, key="data.test_path")
        if test.classes != full.classes:
            raise ConfigError(f"data.test_path: classes {test.classes} differ from data.path's {full.classes}")
        full.transform = augment
        return full, test
    return full.split(cfg.test_fraction, seed, augment)


def write_image_folder(root: str, x: np.ndarray, y: np.ndarray, suffix: str = ".png") -> None:
    """Write ``x`` (N, C, H, W) in [0, 1] as ``root/<label>/<n>.png`` (test data, benchmarks)."""
    from PIL import Image

    for n, (img, label) in enumerate(zip(x, y)):
        folder = Path(root) / f"class{int(label):03d}"
        folder.mkdir(parents=True, exist_ok=True)
        arr = (np.clip(img, 0, 1) * 255).round().astype(np.uint8).transpose(1, 2, 0)
        Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr).save(folder / f"{n:06d}{suffix}")


def write_npz_shards(prefix: str, x: np.ndarray, y: np.ndarray, sizes: Sequence[int]) -> list[str]:
    """Cut ``x, y`` into shards of ``sizes`` samples: ``{prefix}-00000.npz`` ... (test data)."""
    paths, start = [], 0
    for i, n in enumerate(sizes):
        path = f"{prefix}-{i:05d}.npz"
        np.savez(path, x=x[start:start + n], y=y[start:start + n])
        paths.append(path)
        start += n
    return paths


def build_shards(cfg) -> tuple[NpzShards, NpzShards]:
    """(train, test) shard sets for ``data.name: shards``, not yet opened (see :meth:`NpzShards.bind`)."""
    return (NpzShards(cfg.path, cfg.uneven_shards, "data.path"),
            NpzShards(cfg.test_path, "pad", "data.test_path"))
