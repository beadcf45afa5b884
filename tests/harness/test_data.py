import numpy as np
import pytest
import torch
from image_fixtures import write_image_folder

from fractalbench.harness.data import DatasetConfig, DatasetError, load_dataset, stratified_split


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


@pytest.mark.parametrize("held_out", ["test", "val"])
def test_image_folder_with_test_or_val_kept_as_uint8_and_named(tmp_path, held_out):
    root = write_image_folder(tmp_path / "imgs", held_out)
    splits = load_dataset(DatasetConfig("imagefolder", root=str(root)))
    assert splits.info["test_split_on_disk"] == held_out and splits.info["classes"] == ["cat", "dog", "frog"]
    assert len(splits.test) == 9 and len(splits.train) + len(splits.val) == 18 and splits.image_size == 8
    stored = splits.test.images
    assert stored.dtype == torch.uint8 and stored.shape == (9, 3, 8, 8)
    # a sample is the stored pixels normalised with the training split's statistics
    x, y = splits.test[4]
    mean, std = splits.test.mean, splits.test.std
    assert torch.allclose(x, (stored[4].float() / 255 - mean) / std) and int(y) == 1
    fit = splits.train.base.images.float() / 255  # statistics come from the fit split only
    assert torch.allclose(mean.flatten(), fit.mean(dim=(0, 2, 3)), atol=1e-5)


def test_png_pixels_survive_exactly(tmp_path):
    root = write_image_folder(tmp_path / "imgs")
    from PIL import Image

    splits = load_dataset(DatasetConfig("imagefolder", root=str(root)))
    original = np.array(Image.open(root / "test" / "dog" / "0001.png").convert("RGB"))
    assert torch.equal(splits.test.images[4], torch.from_numpy(original).permute(2, 0, 1))  # dog, image 1


def test_a_folder_over_the_memory_limit_streams_from_disk(tmp_path):
    from fractalbench.harness._images import loader_workers

    root = write_image_folder(tmp_path / "imgs")
    in_memory = load_dataset(DatasetConfig("imagefolder", root=str(root)))
    streamed = load_dataset(DatasetConfig("imagefolder", root=str(root), memory_limit_mb=0))
    assert streamed.info["storage"].startswith("streamed") and in_memory.info["storage"].startswith("uint8")
    assert loader_workers(streamed.train) >= 1 and loader_workers(in_memory.train) == 0
    assert torch.equal(streamed.test.labels, in_memory.test.labels)
    for i in (0, 5, 8):  # same pixels either way; the normalisation is estimated from (here: all) train images
        assert torch.allclose(streamed.test[i][0], in_memory.test[i][0], atol=1e-5)


def test_cifar10_reads_the_image_folder_layout_and_says_so(tmp_path):
    classes = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
    write_image_folder(tmp_path / "cifar10-jpg", n_train=10, n_test=2, size=32, classes=classes)
    splits = load_dataset(DatasetConfig("cifar10", root=str(tmp_path)))  # finds root/cifar10-jpg
    assert splits.info["layout"] == "image folder" and "cifar10-jpg" in splits.info["source"]
    assert splits.num_classes == 10 and len(splits.test) == 20 and splits.train[0][0].shape == (3, 32, 32)
    direct = load_dataset(DatasetConfig("cifar10", root=str(tmp_path / "cifar10-jpg")))
    assert torch.equal(direct.test.images, splits.test.images)


def test_image_folder_errors_name_the_folder(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(DatasetError, match="test/<class>/ \\(or val/\\)"):
        load_dataset(DatasetConfig("imagefolder", root=str(tmp_path / "nothing")))
    (tmp_path / "test" / "a").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no images under"):
        load_dataset(DatasetConfig("imagefolder", root=str(tmp_path)))


def test_digits_read_without_scikit_learn_equal_load_digits():
    from sklearn.datasets import load_digits

    from fractalbench.harness.data import digits_arrays

    pixels, labels = digits_arrays()
    bunch = load_digits()
    assert pixels.shape == (1797, 8, 8) and np.array_equal(pixels, bunch.images)
    assert np.array_equal(labels, bunch.target) and np.bincount(labels).tolist() == np.bincount(bunch.target).tolist()


def test_augment_false_trains_on_the_images_as_they_are(tmp_path):
    from fractalbench.harness.data import Augmented

    digits, plain = load_dataset(DatasetConfig("digits")), load_dataset(DatasetConfig("digits", augment=False))
    assert isinstance(digits.train, Augmented) and not isinstance(plain.train, Augmented)
    assert torch.equal(plain.train[0][0], digits.train.base[0][0])  # the same image, never cropped
    classes = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
    write_image_folder(tmp_path / "cifar10-jpg", n_train=10, n_test=2, size=32, classes=classes)
    assert isinstance(load_dataset(DatasetConfig("cifar10", root=str(tmp_path))).train, Augmented)
    assert not isinstance(load_dataset(DatasetConfig("cifar10", root=str(tmp_path), augment=False)).train, Augmented)
