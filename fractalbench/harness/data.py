"""Datasets: an embedded default, torchvision datasets from a local root, and synthetic data.

- ``digits`` (embedded, no network): scikit-learn's bundled handwritten digits (1,797 real 8x8
  grey images of 10 classes, UCI), scaled to [0, 1] and resized (bilinear) to ``image_size``.
  Fixed stratified split: 20% test, then ``val_fraction`` of the rest as validation.
- ``cifar10``, ``cifar100``, ``mnist``, ``fashion_mnist``, ``svhn``: torchvision's on-disk formats
  under ``root``, downloaded only when ``download`` is true; ``cifar10`` also reads the image-folder
  layout (``root/train``, ``root/test``, or the same under ``root/cifar10-jpg``).
- ``imagefolder``: ``root/train/<class>/*`` with ``root/test/<class>/*`` or ``root/val/<class>/*``.
  Disk datasets are kept as uint8 and normalised as each sample is read (see ``fractalbench.harness._disk_data``);
  an image folder too big for memory streams from disk.
- ``synthetic``: random images and labels for cost-only suites (accuracy there is meaningless).

The validation split is always carved from the training data (stratified, fixed seed), never from
test. Thresholds and other choices are fitted on it.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, Subset, TensorDataset

SPLIT_SEED = 20240601  # fixed: the splits do not move with the suite's training seed

IN_MEMORY_DATASETS = ("digits", "synthetic")  # need no files, so no root
DATASET_NAMES = ("digits", "cifar10", "cifar100", "mnist", "fashion_mnist", "svhn", "imagefolder", "synthetic")


class DatasetError(ValueError):
    """A dataset that is unknown, missing on disk, or asked for with bad options."""


@dataclass(frozen=True)
class DatasetConfig:
    """What to load. ``image_size`` resizes every image to a square of that many pixels (None:
    native size). ``limit_train``/``limit_test`` cap sample counts (stratified), e.g. for CI."""

    name: str = "digits"
    root: str = "data"
    image_size: int | None = None
    val_fraction: float = 0.1
    download: bool = False
    limit_train: int | None = None
    limit_test: int | None = None
    num_classes: int | None = None  # synthetic only
    in_chans: int | None = None  # synthetic only
    num_samples: int | None = None  # synthetic only
    memory_limit_mb: int | None = None  # image folders above this (uint8) stream from disk; None: RAM / 4
    augment: bool = True  # the family's training augmentation (random crop, flip); False: none (LRA)

    @property
    def label(self) -> str:
        return self.name if self.image_size is None else f"{self.name}{self.image_size}"


@dataclass
class DataSplits:
    """Train (augmentation applied), validation and test datasets yielding (image, label)."""

    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    in_chans: int
    image_size: int
    name: str
    info: dict[str, Any] = field(default_factory=dict)


# ----- transforms ---------------------------------------------------------------------------------

class Augmented(Dataset):
    """Applies ``transform`` to the image of each (image, label) pair of ``base``."""

    def __init__(self, base: Dataset, transform: Callable[[Tensor], Tensor]) -> None:
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        x, y = self.base[i]
        return self.transform(x), y


class RandomCropFlip:
    """Pad by ``pad`` pixels (zeros), crop back at a random offset, optionally flip horizontally."""

    def __init__(self, pad: int, flip: bool) -> None:
        self.pad, self.flip = pad, flip

    def __call__(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        if self.pad:
            x = F.pad(x, (self.pad,) * 4)
            i, j = torch.randint(0, 2 * self.pad + 1, (2,)).tolist()
            x = x[..., i:i + h, j:j + w]
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x


def with_augmentation(ds: Dataset, name: str, image_size: int, enabled: bool = True) -> Dataset:
    """``ds`` with the dataset family's training augmentation (see :func:`_augmentation`), if any and
    ``enabled``."""
    aug = _augmentation(name, image_size) if enabled else None
    return Augmented(ds, aug) if aug else ds


def _augmentation(name: str, image_size: int) -> Callable[[Tensor], Tensor] | None:
    pad = max(1, image_size // 8)
    if name in ("cifar10", "cifar100", "imagefolder"):
        return RandomCropFlip(pad, flip=True)
    if name in ("digits", "mnist", "fashion_mnist", "svhn"):
        return RandomCropFlip(max(1, image_size // 16), flip=False)
    return None


def _resize(images: Tensor, size: int | None) -> Tensor:
    if size is None or images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=images.shape[-1] > size)


# ----- splitting ----------------------------------------------------------------------------------

def stratified_split(labels: Sequence[int] | np.ndarray, fraction: float,
                     seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Indices (rest, held_out): ``fraction`` of each class held out, chosen with a fixed seed."""
    labels = np.asarray(labels)
    if not 0.0 < fraction < 1.0:
        raise DatasetError(f"split fraction must be between 0 and 1 (exclusive), got {fraction}")
    rng = np.random.default_rng(seed)
    held = []
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        rng.shuffle(idx)
        k = int(round(len(idx) * fraction))
        held.append(idx[:k])
    held_out = np.sort(np.concatenate(held))
    rest = np.setdiff1d(np.arange(len(labels)), held_out)
    return rest, held_out


def _limit(indices: np.ndarray, labels: np.ndarray, limit: int | None) -> np.ndarray:
    if limit is None or limit >= len(indices):
        return indices
    keep_frac = limit / len(indices)
    _, kept = stratified_split(labels[indices], keep_frac, seed=SPLIT_SEED + 1)
    return indices[kept]


# ----- loaders ------------------------------------------------------------------------------------

def load_dataset(cfg: DatasetConfig) -> DataSplits:
    """Load ``cfg.name``; raises DatasetError naming the dataset, the path and how to get it."""
    if cfg.name not in DATASET_NAMES:
        from fractalbench.harness.registry import unknown_name
        raise DatasetError(str(unknown_name("dataset", cfg.name, list(DATASET_NAMES))))
    if not 0.0 < cfg.val_fraction < 1.0:
        raise DatasetError(f"dataset {cfg.name}: val_fraction must be between 0 and 1, got {cfg.val_fraction}")
    if cfg.name == "digits":
        return _digits(cfg)
    if cfg.name == "synthetic":
        return _synthetic(cfg)
    from fractalbench.harness._disk_data import load_from_disk

    return load_from_disk(cfg, DatasetError)


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 UCI optical digits scikit-learn bundles: pixels [1797, 8, 8] (0-16) and labels. Read
    straight from the package's ``datasets/data/digits.csv.gz`` (as ``load_digits`` reads it), found
    without importing scikit-learn (seconds of imports a resume with nothing to do would wait for)."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if path is None or not path.is_file():  # another layout: let scikit-learn find it
        from sklearn.datasets import load_digits

        bunch = load_digits()
        return np.asarray(bunch.images), np.asarray(bunch.target, dtype=np.int64)
    data = np.loadtxt(path, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64)


def _digits(cfg: DatasetConfig) -> DataSplits:
    pixels, labels = digits_arrays()
    images = torch.tensor(pixels, dtype=torch.float32).unsqueeze(1) / 16.0  # [1797, 1, 8, 8]
    size = cfg.image_size or 8
    images = _resize(images, size)
    train_idx, test_idx = stratified_split(labels, 0.2)
    train_idx = _limit(train_idx, labels, cfg.limit_train)
    test_idx = _limit(test_idx, labels, cfg.limit_test)
    fit_idx, val_pos = stratified_split(labels[train_idx], cfg.val_fraction)
    fit_idx, val_idx = train_idx[fit_idx], train_idx[val_pos]
    mean = images[fit_idx].mean()
    std = images[fit_idx].std().clamp_min(1e-6)
    images = (images - mean) / std
    y = torch.from_numpy(labels)
    make = lambda idx: TensorDataset(images[idx], y[idx])  # noqa: E731
    aug = _augmentation("digits", size) if cfg.augment else None
    train = Augmented(make(fit_idx), aug) if aug else make(fit_idx)
    return DataSplits(train, make(val_idx), make(test_idx), 10, 1, size, cfg.label,
                      {"source": "sklearn.datasets.load_digits (UCI optical digits, bundled)",
                       "n_train": len(fit_idx), "n_val": len(val_idx), "n_test": len(test_idx),
                       "normalisation": {"mean": [float(mean)], "std": [float(std)], "from": "the training split"}})


def _synthetic(cfg: DatasetConfig) -> DataSplits:
    size = cfg.image_size or 32
    classes = cfg.num_classes or 10
    chans = cfg.in_chans or 3
    n = cfg.num_samples or 256
    gen = torch.Generator().manual_seed(SPLIT_SEED)
    images = torch.randn(n, chans, size, size, generator=gen)
    labels = torch.randint(0, classes, (n,), generator=gen)
    third = max(1, n // 3)
    make = lambda a, b: TensorDataset(images[a:b], labels[a:b])  # noqa: E731
    return DataSplits(make(0, third), make(third, 2 * third), make(2 * third, n), classes, chans, size, cfg.label,
                      {"source": "synthetic (random normal images, random labels)"})


#: (classes, channels, native side, training images) of the on-disk datasets, for checking a suite's
#: models where the files are not there (:func:`stand_in_splits`).
KNOWN_SHAPES = {"cifar10": (10, 3, 32, 50_000), "cifar100": (100, 3, 32, 50_000), "mnist": (10, 1, 28, 60_000),
                "fashion_mnist": (10, 1, 28, 60_000), "svhn": (10, 3, 32, 73_257)}


class _Zeros(Dataset):
    """``n`` zero images of one shape with label 0 (a stand-in split: only its length and shape count)."""

    def __init__(self, n: int, shape: tuple[int, int, int]) -> None:
        self.n, self.shape = n, shape

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return torch.zeros(self.shape), 0


def stand_in_splits(cfg: DatasetConfig) -> DataSplits | None:
    """Splits of zeros with the shape, classes and split sizes ``cfg`` would load (``info["stand_in"]``
    true), for checking a suite where the dataset's files are absent (``fractalbench validate``); None
    for a dataset whose shape is only known from its files (an image folder)."""
    if cfg.name not in KNOWN_SHAPES:
        return None
    classes, chans, side, n = KNOWN_SHAPES[cfg.name]
    size = cfg.image_size or side
    n = min(n, cfg.limit_train or n)
    n_val = int(round(n * cfg.val_fraction))
    shape = (chans, size, size)
    return DataSplits(_Zeros(n - n_val, shape), _Zeros(n_val, shape), _Zeros(1, shape), classes, chans, size,
                      cfg.label, {"source": "stand-in (the files are not here)", "stand_in": True})


def input_shape(splits: DataSplits) -> tuple[int, int, int]:
    return splits.in_chans, splits.image_size, splits.image_size


def subset(ds: Dataset, n: int) -> Dataset:
    return Subset(ds, list(range(min(n, len(ds)))))  # type: ignore[arg-type]


def with_normalisation(splits: DataSplits, mean: Sequence[float], std: Sequence[float], declared_by: str) -> DataSplits:
    """``splits`` normalised with ``mean``/``std`` (per channel, of [0, 1] pixels) instead of the
    training split's statistics: the same stored pixels, read through the new statistics (trained
    weights declare the normalisation they were trained with). ValueError for a dataset that does not
    keep its raw pixels (the digits and synthetic data are stored normalised) or a channel mismatch."""
    from dataclasses import replace

    from fractalbench.harness._images import ImageFiles, UInt8Images

    if len(mean) != splits.in_chans or len(std) != splits.in_chans:
        raise ValueError(f"the weights' normalisation has {len(mean)} channel(s) (declared by {declared_by}); dataset "
                         f"{splits.name} has {splits.in_chans}")
    m, s = torch.tensor([float(v) for v in mean]), torch.tensor([float(v) for v in std])

    def renormalised(ds: Dataset) -> Dataset:
        if isinstance(ds, Augmented):
            return Augmented(renormalised(ds.base), ds.transform)
        if isinstance(ds, UInt8Images):
            return UInt8Images(ds.images, ds.labels, m, s)
        if isinstance(ds, ImageFiles):
            return ImageFiles(ds.paths, ds.labels, ds.size, m, s)
        raise ValueError(f"dataset {splits.name} is stored normalised ({type(ds).__name__}), so the weights' own "
                         f"normalisation (declared by {declared_by}) cannot be applied to it")

    info = {**splits.info, "normalisation": {"mean": [float(v) for v in mean], "std": [float(v) for v in std],
                                             "from": f"the weights: {declared_by}",
                                             "split_statistics": splits.info.get("normalisation")}}
    return replace(splits, train=renormalised(splits.train), val=renormalised(splits.val),
                   test=renormalised(splits.test), info=info)
