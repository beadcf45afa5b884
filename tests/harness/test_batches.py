"""Training batches on the device: the same samples, normalisation and augmentation as the
per-sample DataLoader path."""
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler

from fractalbench.harness._batches import CropFlip, DeviceBatches, device_batches_for
from fractalbench.harness._images import UInt8Images
from fractalbench.harness.data import Augmented, RandomCropFlip
from fractalbench.harness.train import TrainConfig, train_model


def images(n=40, size=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 4, (n,), generator=gen)
    return UInt8Images(pixels, labels, torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0.2, 0.25, 0.3]))


def one_by_one(x, rows, cols, flips, pad):
    """What RandomCropFlip does to one normalised image, at a given offset and flip."""
    out = []
    for img, i, j, f in zip(x, rows.tolist(), cols.tolist(), flips.tolist()):
        h, w = img.shape[-2:]
        img = F.pad(img, (pad,) * 4)[..., i:i + h, j:j + w]
        out.append(img.flip(-1) if f else img)
    return torch.stack(out)


def test_batched_crop_and_flip_equal_the_per_sample_transform():
    ds = images()
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    aug = CropFlip(pad=2, flip=True)
    rows, cols, flips = aug.draw(len(ds), torch.Generator().manual_seed(3))
    assert rows.min() >= 0 and rows.max() <= 4 and 0 < flips.sum() < len(ds)  # offsets 0..2*pad, some flipped
    assert torch.equal(aug.apply(x, rows, cols, flips), one_by_one(x, rows, cols, flips, 2))


def test_device_batches_follow_the_sampler_like_the_dataloader():
    ds = images(n=37)
    sampler = DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=5, drop_last=True)
    fast = DeviceBatches(ds, None, sampler, 8, "cpu", seed=5)
    slow = DataLoader(ds, batch_size=8, sampler=sampler, drop_last=True)
    pairs = list(zip(fast, slow))
    assert len(pairs) == len(fast) == 4  # 37 samples, the incomplete fifth batch dropped
    for (xf, yf), (xs, ys) in pairs:
        assert torch.equal(yf, ys) and torch.allclose(xf, xs, atol=1e-6)


def test_only_in_memory_images_with_crop_flip_take_the_device_path():
    ds = images()
    assert device_batches_for(ds) == (ds, None)
    got = device_batches_for(Augmented(ds, RandomCropFlip(1, flip=False)))
    assert got is not None and got[1] == CropFlip(1, False)
    assert device_batches_for(Augmented(ds, lambda x: x)) is None  # another transform: the DataLoader path
    assert device_batches_for(torch.utils.data.TensorDataset(torch.zeros(4, 3, 8, 8), torch.zeros(4))) is None


def test_training_on_device_batches_learns_and_each_epoch_augments_anew():
    torch.manual_seed(0)
    base = images(n=64)
    base.labels = base.images.float().mean(dim=(2, 3)).argmax(dim=1)  # the brightest channel: learnable
    ds = Augmented(base, RandomCropFlip(1, flip=True))
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 3))
    cfg = TrainConfig(epochs=4, batch_size=16, lr=0.05, schedule="none", momentum=0.0, weight_decay=0.0)
    result = train_model(model, ds, cfg)
    assert len(result.history) == 4 and result.history[-1]["loss"] < result.history[0]["loss"]
    fast = DeviceBatches(*device_batches_for(ds), DistributedSampler(ds, 1, 0, shuffle=False), 64, "cpu", seed=0)
    first = next(iter(fast))[0]
    fast.set_epoch(1)
    assert not torch.equal(first, next(iter(fast))[0])  # a new draw of offsets per epoch
