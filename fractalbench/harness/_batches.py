"""Training batches assembled as tensors on the training device (the trainer's fast path).

For an in-memory image dataset (:class:`fractalbench.harness._images.UInt8Images`, optionally wrapped in the
dataset family's :class:`fractalbench.harness.data.Augmented` random crop and flip), the uint8 images go to the
device once; each batch is gathered there by the sampler's indices, normalised, and augmented for
all its samples at once: every sample gets its own crop offset and flip, drawn from a CPU generator
seeded per epoch (so CPU and GPU runs, and resumed runs, see the same augmentation), and applied
by one gather (no Python loop over samples, no DataLoader worker). The result is what the
per-sample path computes: ``RandomCropFlip`` pads the normalised image with zeros and crops at
the offset, then flips (a test checks the two agree sample by sample for the same offsets).

Datasets this does not cover (images decoded from disk, other transforms, anything else) keep the
DataLoader path.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from fractalbench.harness._images import UInt8Images


@dataclass(frozen=True)
class CropFlip:
    """Per-sample augmentation of a batch: zero-pad by ``pad``, crop back at random offsets, flip
    horizontally with probability 1/2 when ``flip``."""

    pad: int
    flip: bool

    def draw(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """(row offsets [n], column offsets [n], flip mask [n]) on the CPU."""
        offsets = torch.randint(0, 2 * self.pad + 1, (2, n), generator=generator) if self.pad else torch.zeros(
            2, n, dtype=torch.long)
        flips = torch.rand(n, generator=generator) < 0.5 if self.flip else torch.zeros(n, dtype=torch.bool)
        return offsets[0], offsets[1], flips

    def apply(self, x: Tensor, rows: Tensor, cols: Tensor, flips: Tensor) -> Tensor:
        """``x`` [B, C, H, W] with sample b cropped at (rows[b], cols[b]) of its padded image and
        mirrored where flips[b]."""
        b, _, h, w = x.shape
        if self.pad:
            padded = F.pad(x, (self.pad,) * 4)
            r = rows.to(x.device)[:, None] + torch.arange(h, device=x.device)  # [B, H]
            c = cols.to(x.device)[:, None] + torch.arange(w, device=x.device)  # [B, W]
            batch = torch.arange(b, device=x.device)[:, None, None]
            x = padded.permute(0, 2, 3, 1)[batch, r[:, :, None], c[:, None, :]].permute(0, 3, 1, 2)
        if self.flip:
            x = torch.where(flips.to(x.device)[:, None, None, None], x.flip(-1), x)
        return x.contiguous()


def device_batches_for(train_set: Dataset) -> tuple[UInt8Images, CropFlip | None] | None:
    """(the uint8 images, their augmentation) when ``train_set`` can be batched on the device."""
    from fractalbench.harness.data import Augmented, RandomCropFlip

    base, aug = train_set, None
    if isinstance(train_set, Augmented):
        if not isinstance(train_set.transform, RandomCropFlip):
            return None
        base, aug = train_set.base, CropFlip(train_set.transform.pad, train_set.transform.flip)
    if not isinstance(base, UInt8Images):
        return None
    return base, aug


class DeviceBatches:
    """Iterates (x, y) batches of ``images`` on ``device`` in the order of ``sampler``
    (``batch_size`` samples each, the last incomplete one dropped), as the DataLoader would."""

    def __init__(self, images: UInt8Images, augmentation: CropFlip | None, sampler: Sampler, batch_size: int,
                 device: str | torch.device, seed: int) -> None:
        self.device = torch.device(device)
        self.pixels = images.images.to(self.device)  # uint8, once
        self.labels = images.labels.to(self.device)
        self.mean, self.std = images.mean.to(self.device), images.std.to(self.device)
        self.augmentation, self.sampler, self.batch_size, self.seed = augmentation, sampler, batch_size, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        order = torch.as_tensor(list(iter(self.sampler)), dtype=torch.long)
        generator = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            index = order[start:start + self.batch_size].to(self.device, non_blocking=True)
            x = (self.pixels[index].float().div_(255.0) - self.mean) / self.std
            if self.augmentation is not None:
                x = self.augmentation.apply(x, *self.augmentation.draw(x.shape[0], generator))
            yield x, self.labels[index]
