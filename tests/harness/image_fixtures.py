"""Image folders in the real on-disk layout, for the data and CLI tests."""
from __future__ import annotations

import numpy as np


def write_image_folder(root, held_out="test", n_train=6, n_test=3, size=8, classes=("cat", "dog", "frog")):
    """A tiny image folder in the real on-disk layout: root/{train,held_out}/<class>/<n>.jpg (and .png)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), (held_out, n_test)):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                pixels[..., c % 3] = 255  # a class-coloured channel, so classes differ
                Image.fromarray(pixels).save(folder / f"{i:04d}.{'png' if i % 2 else 'jpg'}")
    return root
