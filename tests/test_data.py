"""Data sets: splits, file formats, binarization and checks."""

from __future__ import annotations

import gzip
import re

import numpy as np
import pytest
import torch
from torch.distributions import constraints

from pyrovae.inference import PyrovaeError, load_data, load_spec
from pyrovae.inference.experiment.data import check_data


def test_digits_splits_offline():
    data = load_data("digits", "none")
    assert data.image_shape == (8, 8) and data.features == 64
    assert len(data.train) + len(data.validation) + len(data.test) == 1797
    assert 0 <= data.train.min() and data.train.max() <= 1
    assert data.train_labels is not None and len(data.train_labels) == len(data.train)
    assert not data.dynamic


def test_binarization_modes():
    dynamic = load_data("digits", "dynamic")
    static = load_data("digits", "static")
    assert dynamic.dynamic and not static.dynamic
    assert not set(dynamic.train.unique().tolist()) <= {
        0.0,
        1.0,
    }  # grey levels, resampled per batch
    for split in (dynamic.test, static.train, static.test):
        assert set(split.unique().tolist()) <= {0.0, 1.0}
    # The evaluation splits are binarized once with a fixed seed: identical across loads.
    assert torch.equal(dynamic.test, load_data("digits", "dynamic").test)
    assert torch.equal(static.train, load_data("digits", "static").train)


def test_mnist_from_keras_npz(mnist_npz):
    data = load_data("mnist", "dynamic", path=str(mnist_npz))
    assert (len(data.train), len(data.validation), len(data.test)) == (50_000, 10_000, 10_000)
    assert data.image_shape == (28, 28)
    assert data.test_labels is not None and data.test_labels.shape == (10_000,)


def _write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_mnist_from_idx_files_through_env(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    for stem, shape in [
        ("train-images-idx3-ubyte", (40, 28, 28)),
        ("train-labels-idx1-ubyte", (40,)),
        ("t10k-images-idx3-ubyte", (10, 28, 28)),
        ("t10k-labels-idx1-ubyte", (10,)),
    ]:
        _write_idx(tmp_path / f"{stem}.gz", rng.integers(0, 256 if len(shape) > 1 else 10, shape))
    monkeypatch.setenv("PYROVAE_DATA", str(tmp_path))
    data = load_data("mnist", "none", validation_size=8)
    assert (len(data.train), len(data.validation), len(data.test)) == (32, 8, 10)
    assert data.image_shape == (28, 28) and data.train.max() <= 1


def test_missing_mnist_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("PYROVAE_DATA", str(tmp_path))
    with pytest.raises(PyrovaeError) as info:
        load_data("fashion-mnist")
    message = str(info.value)
    assert str(tmp_path) in message and "fashion-mnist.npz" in message and "PYROVAE_DATA" in message
    # Why no download was tried, in the user's terms.
    try:
        import torchvision  # noqa: F401
    except ImportError:
        assert "torchvision, which could download it, is not installed" in message
    else:
        assert "torchvision could not download it" in message


def test_user_arrays(tmp_path):
    x = np.random.default_rng(0).random((100, 6)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    data = load_data(str(tmp_path / "x.npy"), "none")
    assert data.image_shape is None and data.features == 6
    assert len(data.train) + len(data.validation) + len(data.test) == 100
    np.savez(tmp_path / "x.npz", x_train=x[:80], x_test=x[80:])
    assert len(load_data(str(tmp_path / "x.npz"), "none").test) == 20


@pytest.mark.parametrize(
    "array, message",
    [
        (np.full((10, 3), np.nan), "NaN or infinite"),
        (np.array([1.0, 2.0, np.inf] * 10), "expected (points, features)"),
        (np.array([[0.5, 2.0]] * 10), "needs values in [0, 1]"),
    ],
)
def test_bad_arrays_are_rejected(tmp_path, array, message):
    np.save(tmp_path / "bad.npy", array)
    binarize = "dynamic" if "[0, 1]" in message else "none"
    with pytest.raises(PyrovaeError, match=re.escape(message)) as info:
        load_data(str(tmp_path / "bad.npy"), binarize)
    assert "\n" not in str(info.value)


def test_missing_file_and_unknown_name(tmp_path):
    with pytest.raises(PyrovaeError, match="does not exist"):
        load_data(str(tmp_path / "nope.npz"))
    with pytest.raises(PyrovaeError, match="valid: digits, mnist, fashion-mnist"):
        load_data("cifar")
    with pytest.raises(PyrovaeError, match="valid: none, dynamic, static"):
        load_data("digits", "sometimes")


def test_check_data_support():
    check_data(torch.rand(3, 2), "x", constraints.unit_interval)
    with pytest.raises(PyrovaeError, match="outside the likelihood's support"):
        check_data(torch.tensor([[1.5, 0.0]]), "x", constraints.unit_interval)
    with pytest.raises(PyrovaeError, match="non-empty"):
        check_data(torch.zeros(0, 3), "x")


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (0, r"has shape \(0, 16\): no data points to learn from"),
        (2, "the training data have 2 points, and data.validation_size = 0.1 holds out 0"),
    ],
)
def test_too_little_data_is_said_with_the_real_counts(tmp_path, rows, message):
    path = tmp_path / "x.npy"
    np.save(path, np.random.default_rng(0).random((rows, 16)).astype(np.float32))
    with pytest.raises(PyrovaeError, match=message):
        load_data(str(path))


def test_a_data_file_given_as_the_spec_is_one_line(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, np.zeros((4, 4), dtype=np.float32))
    with pytest.raises(PyrovaeError, match="is not a text file .* --set data.name"):
        load_spec(path)
