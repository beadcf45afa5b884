"""Image storage for the datasets: uint8 in memory, normalised as each sample is read, or image files
decoded from disk on every read (for folders too big for memory, read through DataLoader workers).

uint8 keeps a dataset at a quarter of its float32 size: CIFAR-10's 60,000 images take 184 MB, not
737 MB. Normalisation (per channel, with the mean and standard deviation of the training split
only) happens in ``__getitem__``, so the stored pixels are exactly the decoded ones.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class UInt8Images(Dataset):
    """uint8 images [N, C, H, W] and labels [N]; item i is ((image / 255 - mean) / std, label)
    with ``mean``/``std`` per channel ([C, 1, 1], of pixel values in [0, 1])."""

    streams_from_disk = False

    def __init__(self, images: Tensor, labels: Tensor, mean: Tensor, std: Tensor) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"UInt8Images needs uint8 images [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        self.images, self.labels = images, labels
        self.mean, self.std = mean.reshape(-1, 1, 1).float(), std.reshape(-1, 1, 1).float()

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return (self.images[i].float().div_(255.0) - self.mean) / self.std, self.labels[i]

    def subset(self, indices: np.ndarray) -> UInt8Images:
        index = torch.as_tensor(indices, dtype=torch.long)
        return UInt8Images(self.images[index], self.labels[index], self.mean, self.std)


class ImageFiles(Dataset):
    """Image files decoded (RGB, resized to ``size`` x ``size``) on every read, normalised like
    :class:`UInt8Images`. Readers should use DataLoader workers (``streams_from_disk``)."""

    streams_from_disk = True

    def __init__(self, paths: Sequence[Path], labels: Tensor, size: int, mean: Tensor, std: Tensor) -> None:
        self.paths, self.labels, self.size = list(paths), labels, size
        self.mean, self.std = mean.reshape(-1, 1, 1).float(), std.reshape(-1, 1, 1).float()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        pixels = torch.from_numpy(decode_image(self.paths[i], self.size)).permute(2, 0, 1)
        return (pixels.float().div_(255.0) - self.mean) / self.std, self.labels[i]

    def subset(self, indices: np.ndarray) -> ImageFiles:
        return ImageFiles([self.paths[i] for i in indices], self.labels[torch.as_tensor(indices)], self.size,
                          self.mean, self.std)


def loader_workers(ds: Dataset) -> int:
    """DataLoader worker processes for reading ``ds``: some for datasets that decode from disk, else 0."""
    base = getattr(ds, "base", ds)  # through an augmentation wrapper
    if getattr(base, "streams_from_disk", False):
        return max(1, min(4, (os.cpu_count() or 2)))
    return 0


def list_image_folder(folder: Path) -> tuple[list[Path], np.ndarray, list[str]]:
    """(image paths, labels, class names) of ``folder/<class>/<image>``; classes sorted by name (as
    torchvision's ImageFolder does), images sorted by path."""
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    paths, labels = [], []
    for index, name in enumerate(classes):
        files = sorted(p for p in (folder / name).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        paths.extend(files)
        labels.extend([index] * len(files))
    return paths, np.asarray(labels, dtype=np.int64), classes


def decode_image(path: Path, size: int) -> np.ndarray:
    """One image as uint8 [size, size, 3] (RGB; bilinear resize with antialiasing when needed)."""
    from PIL import Image

    with Image.open(path) as image:
        rgb = image.convert("RGB")
        if rgb.size != (size, size):
            rgb = rgb.resize((size, size), Image.BILINEAR, reducing_gap=None)
        return np.array(rgb, dtype=np.uint8)  # a writable copy


def decode_images(paths: Sequence[Path], size: int, threads: int = 4) -> Tensor:
    """Every image as uint8 [N, 3, size, size], decoded by a few threads (PIL releases the GIL)."""
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)

    def one(i: int) -> None:
        out[i] = decode_image(paths[i], size)

    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(one, range(len(paths)), chunksize=256))
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def channel_stats(images: Tensor, indices: np.ndarray, chunk: int = 4096) -> tuple[Tensor, Tensor]:
    """Per-channel mean and standard deviation (pixels scaled to [0, 1]) of ``images[indices]``
    (uint8 [N, C, H, W]), accumulated in float64 over chunks (no float copy of the whole set)."""
    channels = images.shape[1]
    total = torch.zeros(channels, dtype=torch.float64)
    squares = torch.zeros(channels, dtype=torch.float64)
    count = 0
    for start in range(0, len(indices), chunk):
        part = images[torch.as_tensor(indices[start:start + chunk])].to(torch.float64).div_(255.0)
        total += part.sum(dim=(0, 2, 3))
        squares += part.pow(2).sum(dim=(0, 2, 3))
        count += part.shape[0] * part.shape[2] * part.shape[3]
    mean = total / count
    var = (squares - count * mean.pow(2)) / max(1, count - 1)
    return mean.float(), var.clamp_min(1e-12).sqrt().float().clamp_min(1e-6)


def resize_uint8(images: Tensor, size: int) -> Tensor:
    """uint8 images [N, C, H, W] resized (bilinear, antialiased when shrinking) and rounded back to uint8."""
    import torch.nn.functional as F

    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    out = torch.empty((images.shape[0], images.shape[1], size, size), dtype=torch.uint8)
    for start in range(0, images.shape[0], 4096):
        part = images[start:start + 4096].float()
        part = F.interpolate(part, size=(size, size), mode="bilinear", align_corners=False,
                             antialias=images.shape[-1] > size)
        out[start:start + 4096] = part.round_().clamp_(0, 255).to(torch.uint8)
    return out
