"""Where data sets come from: scikit-learn's bundled digits, MNIST-style sets from a local
Keras ``.npz`` or IDX files (``data.path``, then ``$PYROVAE_DATA``) or torchvision, and a
user's own ``.npz`` / ``.npy`` file. Each reader returns NumPy arrays by Keras name
(``x_train``, ``y_train``, ``x_test``, ``y_test``); :mod:`.data` checks and splits them."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from pyrovae.inference.errors import PyrovaeError

__all__ = ["NPZ_NAMES", "read_digits", "read_mnist_like", "read_user_file"]

_IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


NPZ_NAMES = {"mnist": "mnist.npz", "fashion-mnist": "fashion-mnist.npz"}


def read_digits() -> dict[str, np.ndarray]:
    """scikit-learn's bundled 8x8 digits in [0, 1], shuffled once, the last 300 as test."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = digits.images.astype(np.float32) / 16.0
    y = digits.target
    # A fixed permutation: the bundled file is ordered by writer, not shuffled.
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    n_test = 300
    return {
        "x_train": x[:-n_test],
        "y_train": y[:-n_test],
        "x_test": x[-n_test:],
        "y_test": y[-n_test:],
    }


def read_mnist_like(name: str, path: str | None) -> tuple[dict[str, np.ndarray], Path | None]:
    looked: list[str] = []
    candidates = [Path(path).expanduser()] if path else []
    if os.environ.get("PYROVAE_DATA"):
        candidates.append(Path(os.environ["PYROVAE_DATA"]).expanduser())
    for candidate in candidates:
        found = _read_local(candidate, name)
        if found is not None:
            return found
        looked.append(str(candidate))
    arrays, why = _torchvision(name)
    if arrays is not None:
        return arrays, None
    where = ", ".join(looked) if looked else "nowhere (no data.path, PYROVAE_DATA unset)"
    raise PyrovaeError(
        f"{name} not found: looked in {where}, and {why}; put a Keras-layout "
        f"{NPZ_NAMES[name]} (x_train, y_train, x_test, y_test) or the IDX files in a "
        "directory and set data.path or PYROVAE_DATA to it"
    )


def _read_local(candidate: Path, name: str) -> tuple[dict[str, np.ndarray], Path] | None:
    """The arrays found at ``candidate`` (a file or a directory) and the file or folder they
    came from, or None."""
    if candidate.is_file():
        return read_user_file(candidate), candidate.resolve()
    if not candidate.is_dir():
        return None
    npz = candidate / NPZ_NAMES[name]
    if npz.is_file():
        return read_user_file(npz), npz.resolve()
    for folder in (candidate, candidate / name, candidate / name.replace("-", "_").upper() / "raw"):
        files = {k: _idx_path(folder, v) for k, v in _IDX_FILES.items()}
        if all(f is not None for f in files.values()):
            return {k: _read_idx(f) for k, f in files.items()}, folder.resolve()
    return None


def _idx_path(folder: Path, stem: str) -> Path | None:
    for suffix in ("", ".gz"):
        f = folder / (stem + suffix)
        if f.is_file():
            return f
    return None


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _torchvision(name: str) -> tuple[dict[str, np.ndarray] | None, str]:
    """The data set through torchvision's downloader, or None and why not."""
    try:
        from torchvision import datasets
    except ImportError:
        return None, "torchvision, which could download it, is not installed"
    except Exception as e:  # noqa: BLE001 - a broken install is reported the same way
        return None, f"torchvision does not import ({type(e).__name__})"
    root = Path(os.environ.get("PYROVAE_DATA", Path.home() / ".cache" / "pyrovae"))
    cls = datasets.MNIST if name == "mnist" else datasets.FashionMNIST
    try:
        train = cls(root, train=True, download=True)
        test = cls(root, train=False, download=True)
    except Exception:  # noqa: BLE001 - offline or blocked: fall through to the error message
        return None, "torchvision could not download it (offline?)"
    arrays = {
        "x_train": train.data.numpy(),
        "y_train": train.targets.numpy(),
        "x_test": test.data.numpy(),
        "y_test": test.targets.numpy(),
    }
    return arrays, ""


def read_user_file(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise PyrovaeError(f"data file {path} does not exist; check data.name or data.path")
    try:
        loaded = np.load(path, allow_pickle=False)
    except Exception as e:  # noqa: BLE001
        raise PyrovaeError(f"cannot read {path} as a NumPy file: {e}") from None
    if isinstance(loaded, np.ndarray):
        return {"x_train": loaded}
    with loaded:
        keys = set(loaded.files)
        if "x_train" in keys:
            return {k: loaded[k] for k in ("x_train", "y_train", "x_test", "y_test") if k in keys}
        if len(keys) == 1:
            return {"x_train": loaded[keys.pop()]}
    raise PyrovaeError(
        f"{path} has arrays {sorted(keys)}; expected x_train (and optionally y_train, x_test, "
        "y_test) or a single array"
    )
