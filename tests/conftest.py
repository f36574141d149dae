from __future__ import annotations

import os
from pathlib import Path

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


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
