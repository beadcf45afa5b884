import numpy as np
import pytest
import torch

from harness.data import DatasetConfig, DatasetError, load_dataset, stratified_split


def test_digits_is_real_embedded_data_with_fixed_stratified_splits():
    a = load_dataset(DatasetConfig("digits", image_size=16))
    b = load_dataset(DatasetConfig("digits", image_size=16))
    # 1,797 images: 20% test (360 = per-class rounding), validation 10% of the rest
    n_train, n_val, n_test = len(a.train), len(a.val), len(a.test)
    assert n_train + n_val + n_test == 1797
    assert n_test == pytest.approx(0.2 * 1797, abs=10) and n_val == pytest.approx(0.1 * (1797 - n_test), abs=10)
    assert a.num_classes == 10 and a.in_chans == 1 and a.val[0][0].shape == (1, 16, 16)
    assert torch.equal(a.test.tensors[0], b.test.tensors[0])
    labels = a.test.tensors[1].numpy()
    assert np.bincount(labels).min() >= 34  # every class present in proportion (about 36 each)


def test_validation_is_carved_from_training_never_from_test():
    splits = load_dataset(DatasetConfig("digits", image_size=8))
    test = {tuple(x.flatten().tolist()) for x in splits.test.tensors[0]}
    val = {tuple(x.flatten().tolist()) for x in splits.val.tensors[0]}
    train = {tuple(x.flatten().tolist()) for x in splits.train.base.tensors[0]}
    assert not (val & train) or len(val & train) < 5  # digits has a few duplicate images across classes
    assert len(val & test) < 5 and len(val) > 100


def test_stratified_split_holds_out_the_fraction_of_each_class():
    labels = np.array([0] * 50 + [1] * 30)
    rest, held = stratified_split(labels, 0.2)
    assert np.bincount(labels[held]).tolist() == [10, 6]
    assert len(set(rest) | set(held)) == 80 and not set(rest) & set(held)


def test_missing_dataset_names_path_and_how_to_get_it(tmp_path):
    with pytest.raises(DatasetError) as err:
        load_dataset(DatasetConfig("cifar10", root=str(tmp_path / "nowhere")))
    msg = str(err.value)
    assert "dataset cifar10" in msg and str(tmp_path / "nowhere") in msg and "download: true" in msg


def test_unknown_dataset_lists_allowed():
    with pytest.raises(DatasetError, match="unknown dataset 'digit'; did you mean: digits"):
        load_dataset(DatasetConfig("digit"))


def test_cifar10_from_a_local_root_in_the_real_format(tmp_path, monkeypatch):
    """A tiny CIFAR-10 folder in torchvision's on-disk format (pickled batches) loads."""
    import pickle

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)

    def batch(n):
        return {"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8), "labels": [int(v) for v in np.arange(n) % 10]}

    for i in range(1, 6):
        with open(folder / f"data_batch_{i}", "wb") as fh:
            pickle.dump(batch(20), fh)
    with open(folder / "test_batch", "wb") as fh:
        pickle.dump(batch(20), fh)
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, fh)
    import torchvision.datasets.cifar as cifar

    # our fixture has other checksums than the real archive
    monkeypatch.setattr(cifar.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(cifar, "check_integrity", lambda *a, **k: True)
    splits = load_dataset(DatasetConfig("cifar10", root=str(tmp_path), image_size=16))
    assert len(splits.test) == 20 and len(splits.train) + len(splits.val) == 100
    assert splits.train[0][0].shape == (3, 16, 16) and splits.num_classes == 10


def test_mnist_from_a_local_root_in_the_real_format(tmp_path):
    """MNIST's raw idx files (as torchvision keeps them) load."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def write_idx(path, arr, magic):
        with open(path, "wb") as fh:
            fh.write(magic.to_bytes(4, "big"))
            for d in arr.shape:
                fh.write(int(d).to_bytes(4, "big"))
            fh.write(arr.astype(np.uint8).tobytes())

    for prefix, n in (("train", 40), ("t10k", 20)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 255, (n, 28, 28)), 2051)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10, 2049)
    splits = load_dataset(DatasetConfig("mnist", root=str(tmp_path), image_size=14))
    assert len(splits.test) == 20 and splits.in_chans == 1 and splits.test[0][0].shape == (1, 14, 14)


def test_synthetic_for_cost_only_suites():
    splits = load_dataset(DatasetConfig("synthetic", image_size=32, num_classes=100, in_chans=3, num_samples=30))
    assert splits.num_classes == 100 and splits.test[0][0].shape == (3, 32, 32)
