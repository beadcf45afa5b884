"""Datasets read from a directory: torchvision's on-disk formats and image folders.

- Image folders: ``root/train/<class>/*`` with the held-out split in ``root/test/<class>/*`` (the
  common layout, e.g. CIFAR-10 as images) or ``root/val/<class>/*`` (ImageNet style). Which folder
  was the held-out split is stated in the splits' ``info`` (stored with every cell). Images are
  decoded once and kept as uint8; a folder whose uint8 pixels exceed the memory limit (the
  dataset's ``memory_limit_mb``, default a quarter of this machine's memory) is streamed from
  disk instead (decoded on every read, through DataLoader workers).
- ``cifar10`` reads torchvision's files (``root/cifar-10-batches-py``) or the image-folder layout
  at ``root`` or ``root/cifar10-jpg`` (where ``tar -xzf cifar10-jpg.tar.gz -C data`` puts it with
  the default root ``data``), and says which it found.

Normalisation uses the per-channel mean and standard deviation of the training split (after the
validation split is carved out), never of validation or test.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fractalbench.harness._images import (
    ImageFiles,
    UInt8Images,
    channel_stats,
    decode_images,
    list_image_folder,
    resize_uint8,
)

log = logging.getLogger(__name__)

TORCHVISION_FORMATS = {
    "cifar10": ("CIFAR10", 10, 3, "cifar-10-batches-py"),
    "cifar100": ("CIFAR100", 100, 3, "cifar-100-python"),
    "mnist": ("MNIST", 10, 1, "MNIST/raw"),
    "fashion_mnist": ("FashionMNIST", 10, 1, "FashionMNIST/raw"),
    "svhn": ("SVHN", 10, 3, "train_32x32.mat, test_32x32.mat"),
}
HELD_OUT_DIRS = ("test", "val")
STATS_SAMPLES = 5000  # images decoded to estimate the normalisation of a streamed folder


def load_from_disk(cfg: Any, error: type[Exception]) -> Any:
    """DataSplits of ``cfg`` (a DatasetConfig) from ``cfg.root``; ``error`` (DatasetError) says what is missing."""
    root = Path(cfg.root).expanduser()
    if cfg.name == "imagefolder":
        return _imagefolder(cfg, _image_folder_root(root, cfg.name, error), error)
    if cfg.name == "cifar10" and not (root / TORCHVISION_FORMATS["cifar10"][3]).is_dir():
        folder = next((f for f in (root, root / "cifar10-jpg") if _is_image_folder(f)), None)
        if folder is not None:
            return _imagefolder(cfg, folder, error)
    return _torchvision(cfg, root, error)


def missing_files(cfg: Any) -> str | None:
    """Without reading any image: None when ``cfg``'s files seem to be where :func:`load_from_disk`
    looks (the torchvision folder, or for cifar10 an image folder), else what is missing."""
    root = Path(cfg.root).expanduser()
    if cfg.name == "imagefolder":
        return None if _is_image_folder(root) else f"dataset imagefolder: no train/ and test/ folders under {root}"
    expected = TORCHVISION_FORMATS[cfg.name][3]
    if cfg.name == "cifar10" and any(_is_image_folder(f) for f in (root, root / "cifar10-jpg")):
        return None
    if cfg.name == "svhn":
        found = all((root / f).is_file() for f in ("train_32x32.mat", "test_32x32.mat"))
    else:
        found = (root / expected).is_dir()
    return None if found else f"dataset {cfg.name}: files not found under {root.resolve()} (looked for {expected})"


def _is_image_folder(folder: Path) -> bool:
    return (folder / "train").is_dir() and any((folder / d).is_dir() for d in HELD_OUT_DIRS)


def _image_folder_root(root: Path, name: str, error: type[Exception]) -> Path:
    if not _is_image_folder(root):
        raise error(f"dataset {name}: expected {root.resolve()}/train/<class>/ and {root.resolve()}/test/<class>/ "
                    "(or val/) folders of images; point `root` (or --data-root) at such a folder")
    return root


def _torchvision(cfg: Any, root: Path, error: type[Exception]) -> Any:
    import torchvision

    cls_name, classes, chans, expected = TORCHVISION_FORMATS[cfg.name]
    cls = getattr(torchvision.datasets, cls_name)
    try:
        if cfg.name == "svhn":
            train_raw = cls(str(root), split="train", download=cfg.download)
            test_raw = cls(str(root), split="test", download=cfg.download)
        else:
            train_raw = cls(str(root), train=True, download=cfg.download)
            test_raw = cls(str(root), train=False, download=cfg.download)
    except (RuntimeError, OSError) as exc:
        also = (" or the image-folder layout (train/ and test/) there or in cifar10-jpg/"
                if cfg.name == "cifar10" else "")
        raise error(
            f"dataset {cfg.name}: files not found or unreadable under {root.resolve()} (looked for {expected}{also}: "
            f"{str(exc).splitlines()[0]}). Put the files there, point `root` (or --data-root) at them, or set "
            f"`download: true` in the suite on a machine with network access") from None
    train_x, train_y = _uint8_tensors(train_raw, chans)
    test_x, test_y = _uint8_tensors(test_raw, chans)
    info = {"source": f"torchvision {cfg.name} files ({expected}) under {root}", "layout": "torchvision",
            "test_split_on_disk": "test"}
    return splits_from_uint8(cfg, (train_x, train_y), (test_x, test_y), classes, info)


def _uint8_tensors(ds: Any, chans: int) -> tuple[Tensor, np.ndarray]:
    data = ds.data
    data = data.numpy() if isinstance(data, torch.Tensor) else np.asarray(data)
    if data.ndim == 3:  # N, H, W (MNIST family)
        data = data[:, None]
    elif data.shape[-1] == chans and data.ndim == 4 and data.shape[1] != chans:  # N, H, W, C (CIFAR)
        data = data.transpose(0, 3, 1, 2)
    labels = np.asarray(getattr(ds, "targets", getattr(ds, "labels", None)), dtype=np.int64)
    return torch.from_numpy(np.ascontiguousarray(data, dtype=np.uint8)), labels


def _fit_val_test(cfg: Any, train_y: np.ndarray, test_y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from fractalbench.harness.data import _limit, stratified_split

    train_idx = _limit(np.arange(len(train_y)), train_y, cfg.limit_train)
    test_idx = _limit(np.arange(len(test_y)), test_y, cfg.limit_test)
    fit_pos, val_pos = stratified_split(train_y[train_idx], cfg.val_fraction)
    return train_idx[fit_pos], train_idx[val_pos], test_idx


def splits_from_uint8(cfg: Any, train: tuple[Tensor, np.ndarray], test: tuple[Tensor, np.ndarray], classes: int,
                      info: dict[str, Any]) -> Any:
    """DataSplits from uint8 images [N, C, H, W] and labels: resized to ``cfg.image_size`` (rounded
    back to uint8), validation carved from train, normalised with the fit split's statistics."""
    from fractalbench.harness.data import DataSplits, with_augmentation

    (train_x, train_y), (test_x, test_y) = train, test
    fit_idx, val_idx, test_idx = _fit_val_test(cfg, train_y, test_y)
    size = cfg.image_size or int(train_x.shape[-1])
    train_x, test_x = resize_uint8(train_x, size), resize_uint8(test_x, size)
    mean, std = channel_stats(train_x, fit_idx)
    ty, sy = torch.from_numpy(train_y), torch.from_numpy(test_y)
    full_train, full_test = UInt8Images(train_x, ty, mean, std), UInt8Images(test_x, sy, mean, std)
    megabytes = (train_x.numel() + test_x.numel()) / 2**20
    info = {**info, "storage": f"uint8 in memory ({megabytes:.0f} MiB)", "n_train": len(fit_idx),
            "n_val": len(val_idx), "n_test": len(test_idx), "validation": f"{cfg.val_fraction:g} of train, stratified",
            "normalisation": {"mean": mean.tolist(), "std": std.tolist(), "from": "the training split"}}
    return DataSplits(with_augmentation(full_train.subset(fit_idx), cfg.name, size, cfg.augment),
                      full_train.subset(val_idx),
                      full_test.subset(test_idx), classes, int(train_x.shape[1]), size, cfg.label, info)


def memory_limit_bytes(cfg: Any) -> int:
    if cfg.memory_limit_mb is not None:
        return int(cfg.memory_limit_mb) * 2**20
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError, AttributeError):
        return 4 * 2**30


def _imagefolder(cfg: Any, root: Path, error: type[Exception]) -> Any:
    held_out = next(d for d in HELD_OUT_DIRS if (root / d).is_dir())
    train_paths, train_y, classes = list_image_folder(root / "train")
    test_paths, test_y, test_classes = list_image_folder(root / held_out)
    if not train_paths or not test_paths:
        empty = root / ("train" if not train_paths else held_out)
        raise error(f"dataset {cfg.name}: no images under {empty.resolve()} (expected <class>/<image> files)")
    if test_classes != classes:
        raise error(f"dataset {cfg.name}: {root / held_out} has classes {test_classes}, train/ has {classes}")
    size = cfg.image_size or _native_size(train_paths[0])
    info = {"source": f"image folder {root} (train/ and {held_out}/)", "layout": "image folder",
            "test_split_on_disk": held_out, "classes": classes}
    needed = (len(train_paths) + len(test_paths)) * 3 * size * size
    if needed <= memory_limit_bytes(cfg):
        log.info("decoding %d images from %s", len(train_paths) + len(test_paths), root)
        return splits_from_uint8(cfg, (decode_images(train_paths, size), train_y),
                                 (decode_images(test_paths, size), test_y), len(classes), info)
    return _streamed(cfg, (train_paths, train_y), (test_paths, test_y), len(classes), size,
                     {**info, "uint8_bytes": needed})


def _native_size(path: Path) -> int:
    from PIL import Image

    with Image.open(path) as image:
        return int(min(image.size))


def _streamed(cfg: Any, train: tuple[list[Path], np.ndarray], test: tuple[list[Path], np.ndarray], classes: int,
              size: int, info: dict[str, Any]) -> Any:
    """DataSplits of image files decoded on every read; statistics from a sample of the fit split."""
    from fractalbench.harness.data import SPLIT_SEED, DataSplits, with_augmentation

    (train_paths, train_y), (test_paths, test_y) = train, test
    fit_idx, val_idx, test_idx = _fit_val_test(cfg, train_y, test_y)
    rng = np.random.default_rng(SPLIT_SEED)
    sample = np.sort(rng.choice(fit_idx, size=min(STATS_SAMPLES, len(fit_idx)), replace=False))
    mean, std = channel_stats(decode_images([train_paths[i] for i in sample], size), np.arange(len(sample)))
    ty, sy = torch.from_numpy(train_y), torch.from_numpy(test_y)
    full_train, full_test = ImageFiles(train_paths, ty, size, mean, std), ImageFiles(test_paths, sy, size, mean, std)
    info = {**info, "storage": "streamed from disk (over the memory limit)", "n_train": len(fit_idx),
            "n_val": len(val_idx), "n_test": len(test_idx), "validation": f"{cfg.val_fraction:g} of train, stratified",
            "normalisation": {"mean": mean.tolist(), "std": std.tolist(),
                              "from": f"{len(sample)} images of the training split"}}
    return DataSplits(with_augmentation(full_train.subset(fit_idx), cfg.name, size, cfg.augment),
                      full_train.subset(val_idx),
                      full_test.subset(test_idx), classes, 3, size, cfg.label, info)
