from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyro
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
MNIST_NPZ = Path(
    os.environ.get("PYROVAE_TEST_MNIST", REPO.parent / "shared" / "data" / "mnist.npz")
)


@pytest.fixture(autouse=True)
def _validation_and_seed():
    """Distribution argument validation stays on in tests; every test starts from seed 0."""
    pyro.enable_validation(True)
    pyro.set_rng_seed(0)
    yield


@pytest.fixture
def mnist_npz() -> Path:
    """The real MNIST file in Keras layout; tests using it skip where it is absent."""
    if not MNIST_NPZ.is_file():
        pytest.skip(f"MNIST not found at {MNIST_NPZ}")
    return MNIST_NPZ


@pytest.fixture(scope="session")
def mnist_like():
    """A writer of small MNIST-shaped files in Keras layout: random uint8 digits, labels
    cycling 0-9 so that every class is present (semi-supervised recipes need each one), and
    a ``seed`` so that two files can differ. Returns the path it wrote."""

    def write(path: Path, *, train: int = 200, test: int = 30, seed: int = 0) -> Path:
        rng = np.random.default_rng(seed)
        np.savez(
            path,
            x_train=rng.integers(0, 256, (train, 28, 28), dtype=np.uint8),
            y_train=np.arange(train, dtype=np.uint8) % 10,
            x_test=rng.integers(0, 256, (test, 28, 28), dtype=np.uint8),
            y_test=np.arange(test, dtype=np.uint8) % 10,
        )
        return path

    return write


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
