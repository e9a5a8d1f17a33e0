"""Offline datasets for benchmarks and sample models (pure numpy, never downloads).

* Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (original idx
  files, gzip) in ``/usr/share/datasets/fashion-mnist/``; the directory can be
  overridden with the ``FASHION_MNIST_DIR`` environment variable.
* scikit-learn's bundled 8x8 ``load_digits()`` with a fixed, stratified,
  deterministic train/test split.

Normalisation matches the sample models in ``samples/`` (see
``samples/fashion/metadata.json`` and ``samples/digits/metadata.json``):
pixels are scaled to [0, 1] and then standardised with the constants below.
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

__all__ = [
    "FASHION_MNIST_DIR",
    "FASHION_MEAN",
    "FASHION_STD",
    "FASHION_CLASSES",
    "DIGITS_MEAN",
    "DIGITS_STD",
    "DIGITS_TEST_FRACTION",
    "DIGITS_SPLIT_SEED",
    "DatasetNotFoundError",
    "load_fashion_mnist",
    "load_digits_split",
]

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
# Mean / std of the Fashion-MNIST training pixels after scaling to [0, 1].
FASHION_MEAN = 0.2860
FASHION_STD = 0.3530
FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

# load_digits() pixels are integers 0..16; they are scaled to [0, 1] by /16 and
# then standardised with these constants (mean/std of the whole scaled set).
DIGITS_MEAN = 0.3053
DIGITS_STD = 0.3760
DIGITS_TEST_FRACTION = 0.25
DIGITS_SPLIT_SEED = 0


class DatasetNotFoundError(FileNotFoundError):
    """Raised when the offline Fashion-MNIST files are not installed."""


def _check_split(split: str) -> str:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return split


def _fashion_dir() -> Path:
    env = os.environ.get("FASHION_MNIST_DIR")
    return Path(env) if env else FASHION_MNIST_DIR


def _read_idx(path: Path, expected_ndim: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[0:4], "big")
    dtype_code, ndim = (magic >> 8) & 0xFF, magic & 0xFF
    if dtype_code != 0x08 or ndim != expected_ndim:
        raise ValueError(f"{path}: not an unsigned-byte idx file with {expected_ndim} dims")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{path}: truncated idx file")
    return arr.reshape(shape)


def load_fashion_mnist(split: str = "train", normalize: bool = True):
    """Return ``(x, y)``: x float32 ``[N, 1, 28, 28]``, y int64 ``[N]``.

    ``split`` is ``"train"`` (60,000 images) or ``"test"`` (10,000 images).
    With ``normalize=True`` (the default, what the sample models expect)
    x = (pixel / 255 - FASHION_MEAN) / FASHION_STD; otherwise x = pixel / 255.
    """
    split = _check_split(split)
    d = _fashion_dir()
    img_name, lbl_name = _FASHION_FILES[split]
    img_path, lbl_path = d / img_name, d / lbl_name
    missing = [str(p) for p in (img_path, lbl_path) if not p.is_file()]
    if missing:
        raise DatasetNotFoundError(
            f"Fashion-MNIST files not found ({', '.join(missing)}); install them with: "
            "apt-get update && apt-get install -y dataset-fashion-mnist"
        )
    images = _read_idx(img_path, 3)
    labels = _read_idx(lbl_path, 1)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{d}: {split} images and labels differ in count")
    x = images.astype(np.float32)[:, None, :, :] / np.float32(255.0)
    if normalize:
        x = (x - np.float32(FASHION_MEAN)) / np.float32(FASHION_STD)
    return np.ascontiguousarray(x, dtype=np.float32), labels.astype(np.int64)


def _digits_split_indices(y: np.ndarray):
    """Deterministic stratified split: per class, a fixed permutation; the
    first round(DIGITS_TEST_FRACTION * n_class) go to test."""
    rng = np.random.RandomState(DIGITS_SPLIT_SEED)
    train_idx, test_idx = [], []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        idx = idx[rng.permutation(idx.size)]
        n_test = int(round(DIGITS_TEST_FRACTION * idx.size))
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    return np.sort(np.concatenate(train_idx)), np.sort(np.concatenate(test_idx))


def load_digits_split(split: str = "train", normalize: bool = True):
    """Return ``(x, y)`` from scikit-learn's bundled 8x8 digits (1797 images).

    x float32 ``[N, 1, 8, 8]``, y int64 ``[N]``. The split is fixed and
    deterministic (stratified, 25% test: 1347 train / 450 test images).
    With ``normalize=True`` x = (pixel / 16 - DIGITS_MEAN) / DIGITS_STD.
    """
    split = _check_split(split)
    from sklearn.datasets import load_digits  # bundled with scikit-learn, no download

    data = load_digits()
    x_all = np.asarray(data.images, dtype=np.float32)[:, None, :, :] / np.float32(16.0)
    y_all = np.asarray(data.target, dtype=np.int64)
    train_idx, test_idx = _digits_split_indices(y_all)
    idx = train_idx if split == "train" else test_idx
    x = x_all[idx]
    if normalize:
        x = (x - np.float32(DIGITS_MEAN)) / np.float32(DIGITS_STD)
    return np.ascontiguousarray(x, dtype=np.float32), y_all[idx]
