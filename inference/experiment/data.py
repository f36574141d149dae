"""Data sets: loading, checking, splitting and binarizing.

Every data set becomes float32 tensors of shape ``(N, F)`` (images flattened channel-major,
``image_shape`` ``(H, W)`` or ``(C, H, W)`` kept for networks and plots) with values in [0, 1]
for images (8-bit images as their levels ``k / 255``), split into train / validation / test
with labels kept when there are any.

Evaluation protocol: with ``binarize = "dynamic"`` the training set is resampled
``x ~ Bernoulli(grey level)`` every batch, while validation and test are binarized once with a
fixed seed (as in Burda et al. 2015), so evaluations are comparable across runs; with
``"static"`` every split is binarized once with a fixed seed.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.distributions.constraints import Constraint

from pyrovae.inference.errors import PyrovaeError
from pyrovae.inference.experiment.images import (
    read_cifar10,
    read_image_folder,
    read_sklearn_photos,
)
from pyrovae.inference.experiment.sources import (
    NPZ_NAMES,
    read_digits,
    read_mnist_like,
    read_user_file,
)
from pyrovae.model.labelled import Labelled, data_of

BINARIZE = ("none", "dynamic", "static")
NAMED = ("digits", "mnist", "fashion-mnist", "cifar-10", "sklearn-photos")
IMAGE_SETS = ("sklearn-photos",)
"""Named data sets that ``data.image_size`` and ``data.channels`` apply to, besides folders."""
BINARIZE_SEED = 20151101
"""Seed of the fixed binarization of evaluation splits (and of static training data)."""


LABEL_SEED = 0
"""Seed of the choice of labelled training points (``data.labels_per_class``)."""


@dataclass(frozen=True)
class Splits:
    """A data set split three ways, as float32 tensors of shape ``(N, F)``.

    Attributes:
        train, validation, test: the splits; ``train`` holds grey levels when
            ``dynamic`` is set (binarize each batch with ``torch.bernoulli``). For a labelled
            model (:meth:`with_label_context`, :meth:`with_partial_labels`) each is a
            :class:`~pyrovae.model.labelled.Labelled` batch: x, y and which rows are labelled.
        train_labels, validation_labels, test_labels: integer labels, or None.
        image_shape: ``(H, W)`` or ``(C, H, W)`` for images, None for plain feature vectors.
        dynamic: whether training batches are binarized afresh each time.
        source: the absolute path of the file or folder the data were read from (None for
            the bundled digits and for torchvision's download).
    """

    train: Tensor
    validation: Tensor
    test: Tensor
    train_labels: Tensor | None
    validation_labels: Tensor | None
    test_labels: Tensor | None
    image_shape: tuple[int, ...] | None
    dynamic: bool = False
    source: Path | None = None
    classes: int | None = None
    """The number of classes of labelled splits, None for plain ones."""
    listing: dict[str, list[str]] | None = None
    """For a folder of images, what was read: ``{"files": [...], "classes": [...]}``, paths
    relative to the folder in split order (training, then validation, then test images)
    and the class names; a run keeps it (``images.json``) to read the same images again."""

    @property
    def features(self) -> int:
        """F, the number of data features (pixels for flattened images)."""
        return self.train.shape[1]

    def fingerprint(self) -> str:
        """SHA-256 of every split and its labels, as the model sees them: the same spec
        and file give the same fingerprint, any other data another one."""
        digest = hashlib.sha256()
        for name in ("train", "validation", "test"):
            rows = getattr(self, name)
            if isinstance(rows, Labelled):  # as x beside its one-hot labels, [x, one_hot(y)]
                rows = torch.cat([rows.x, rows.one_hot(self.classes)], 1)
            for tensor in (rows, getattr(self, f"{name}_labels")):
                if tensor is None:
                    digest.update(b"none")
                    continue
                array = tensor.detach().cpu().contiguous().numpy()
                digest.update(f"{name}{array.dtype}{array.shape}".encode())
                digest.update(array.tobytes())
        return digest.hexdigest()

    def with_label_context(self, classes: int) -> Splits:
        """The splits as labelled batches (x and every row's label): the data a conditional
        VAE (``model.labels = "context"``) reads. ``*_labels`` stay as well.

        Raises:
            PyrovaeError: a split without labels, or a label outside ``[0, classes)``.
        """
        rows = {}
        for name in ("train", "validation", "test"):
            labels = getattr(self, f"{name}_labels")
            if labels is None:
                raise PyrovaeError(
                    f"model.labels = 'context' needs labelled data, and the {name} split has "
                    "no labels; use a data set with labels or set model.labels = 'none'"
                )
            if len(labels) and (labels.min() < 0 or labels.max() >= classes):
                raise PyrovaeError(
                    f"the {name} labels run from {int(labels.min())} to {int(labels.max())}, "
                    f"outside [0, model.classes = {classes}); set model.classes"
                )
            rows[name] = Labelled(getattr(self, name), labels)
        return dataclasses.replace(self, classes=classes, **rows)

    def with_partial_labels(
        self, classes: int, per_class: int | None, share: float | None = None
    ) -> Splits:
        """The data a semi-supervised model (M2) reads: labelled batches in which ``per_class``
        training points of each class (picked with a fixed seed; all with None) are labelled
        and every other point is not, validation and test included (their labels stay in
        ``*_labels``, for accuracy).

        With ``share``, the labelled rows are repeated until they make up about that share of
        the training rows, so that every batch holds some (Kingma et al. draw labelled
        points into every minibatch): 100 labels among 50,000 rows are otherwise seen once
        an epoch, one batch in five.

        Raises:
            PyrovaeError: as :meth:`with_label_context`, or a class with fewer than
                ``per_class`` training points.
        """
        rows = self.with_label_context(classes)
        keep = torch.zeros(len(self.train), dtype=torch.bool)
        generator = torch.Generator().manual_seed(LABEL_SEED)
        for c in range(classes):
            members = (self.train_labels == c).nonzero().flatten()
            if per_class is not None and len(members) < per_class:
                raise PyrovaeError(
                    f"class {c} has {len(members)} training points, fewer than "
                    f"data.labels_per_class = {per_class}"
                )
            pick = members[torch.randperm(len(members), generator=generator)][:per_class]
            keep[pick] = True
        train = Labelled(self.train, self.train_labels, keep)
        labelled, unlabelled = int(keep.sum()), int((~keep).sum())
        copies = 1
        if share is not None and labelled and unlabelled:
            copies = max(1, round(share * unlabelled / ((1 - share) * labelled)))
        if copies > 1:  # else the rows stay in their order
            order = torch.cat(
                [(~keep).nonzero().flatten(), keep.nonzero().flatten().repeat(copies)]
            )
            train = train[order]
            rows = dataclasses.replace(rows, train_labels=self.train_labels[order])
        blank = {n: Labelled.unlabelled(getattr(self, n)) for n in ("validation", "test")}
        return dataclasses.replace(rows, train=train, **blank)

    def split(self, name: str) -> tuple[Tensor, Tensor | None]:
        """Returns ``(x, labels)`` of the split ``train``, ``validation`` or ``test``, for evaluation.

        Every split comes back fixed: with dynamic binarization the training set too is
        binarized once, with the fixed seed.
        """
        if name not in ("train", "validation", "test"):
            raise PyrovaeError(f"unknown split {name!r}; valid: train, validation, test")
        x = getattr(self, name)
        if name == "train" and self.dynamic:
            generator = torch.Generator().manual_seed(BINARIZE_SEED)
            binarize = lambda t: torch.bernoulli(t, generator=generator)  # noqa: E731
            x = x.map(binarize) if isinstance(x, Labelled) else binarize(x)
        return x, getattr(self, f"{name}_labels")


def load_data(
    name: str = "digits",
    binarize: str = "none",
    path: str | None = None,
    validation_size: int | float | None = None,
    limit: int | None = None,
    image_size: int | list[int] | None = None,
    channels: int | None = None,
    listing: dict[str, list[str]] | None = None,
) -> Splits:
    """Loads a data set by name or path and prepares its splits.

    Args:
        name: ``digits`` (scikit-learn's bundled 8x8 digits, offline), ``mnist``,
            ``fashion-mnist``, ``cifar-10`` (torchvision's python batches),
            ``sklearn-photos`` (32x32 patches of scikit-learn's two bundled photos, offline;
            see :func:`~.images.photo_patch_positions`), a path to a ``.npz`` / ``.npy``
            file, or a folder of images (PNG, JPEG, ...; class subfolders give labels, as
            torchvision's ``ImageFolder``; see :func:`~.images.read_image_folder`).
        binarize: ``none``, ``dynamic`` or ``static`` (see the module docstring).
        path: a file or directory holding the named data set (Keras-layout ``.npz`` or the
            original IDX files; ``cifar-10-batches-py``); otherwise ``$PYROVAE_DATA`` is
            searched, then (MNIST-style sets) torchvision. For a file or folder, its path
            when given.
        validation_size: points held out of the training set (a count or a fraction); the
            default is 10,000 for MNIST-style sets (the common 50k/10k split), 5,000 for
            CIFAR-10 (45k/5k) and 10% else. A set without a test split (a file of one array,
            a folder) holds out as many again for test. The photos' splits are regions.
        limit: keep only the first ``limit`` training points (after the split), for a quick
            try; validation and test stay whole.
        image_size: for a folder or the photos, the size images are scaled and
            centre-cropped to (a side, or ``[height, width]``); see
            :func:`~.images.read_image_folder`.
        channels: for a folder or the photos, 1 (greyscale) or 3 (RGB); default as found.
        listing: for a folder, the images to read and their order (:attr:`Splits.listing`
            of an earlier load) instead of every image the folder holds now.

    Returns:
        The checked splits.

    Raises:
        PyrovaeError: the data cannot be found, or has NaN/inf, a wrong shape or range.
    """
    if binarize not in BINARIZE:
        raise PyrovaeError(f"unknown data.binarize {binarize!r}; valid: {', '.join(BINARIZE)}")
    source = None
    given = Path(path or name)
    images = name in IMAGE_SETS or (
        name not in NAMED and not name.endswith((".npz", ".npy")) and given.is_dir()
    )
    if not images and (image_size is not None or channels is not None):
        raise PyrovaeError(
            f"data.image_size and data.channels apply to a folder of images and to "
            f"{', '.join(IMAGE_SETS)}, not to data.name = {name!r}; remove them"
        )
    if name == "digits":
        arrays = read_digits()
    elif name in NPZ_NAMES:
        arrays, source = read_mnist_like(name, path)
    elif name == "cifar-10":
        arrays, source = read_cifar10(path)
    elif name == "sklearn-photos":
        arrays = read_sklearn_photos(image_size, channels)
    elif name.endswith((".npz", ".npy")):
        arrays = read_user_file(given)
        source = given.resolve()
    elif images:
        arrays = read_image_folder(given, image_size, channels, listing)
        listing = {name: arrays.pop(name).tolist() for name in ("files", "classes")}
        source = given.resolve()
    else:
        raise PyrovaeError(
            f"unknown data.name {name!r}; valid: {', '.join(NAMED)}, a path to .npz/.npy, or "
            "a folder of images"
            + ("" if given.exists() else f" (there is no file or folder {given})")
        )
    if validation_size is None:
        validation_size = 10_000 if name in NPZ_NAMES else 5_000 if name == "cifar-10" else 0.1
    splits = replace(
        _split(arrays, validation_size), source=source, listing=listing if images else None
    )
    if limit is not None:
        labels = splits.train_labels
        splits = replace(
            splits,
            train=splits.train[:limit],
            train_labels=None if labels is None else labels[:limit],
        )
    return _binarize(splits, binarize)


def check_data(x: Tensor | Labelled, what: str, support: Constraint | None = None) -> None:
    """Checks data once up front: a non-empty ``(N, F)`` tensor of finite values in ``support``.

    Args:
        x: the data.
        what: how to name the data in messages (e.g. "training data").
        support: a torch constraint the values must satisfy, such as
            ``constraints.unit_interval`` for Bernoulli-type likelihoods.

    Raises:
        PyrovaeError: with one line naming the problem.
    """
    x = data_of(x)
    if x.dim() != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise PyrovaeError(
            f"{what} must be a non-empty 2-D array (points, features), got shape {tuple(x.shape)}"
        )
    bad = (~torch.isfinite(x)).sum().item()
    if bad:
        raise PyrovaeError(f"{what} has {bad} NaN or infinite values; clean or impute them first")
    if support is not None and not bool(support.check(x).all()):
        lo, hi = x.min().item(), x.max().item()
        bounds = getattr(support, "lower_bound", None), getattr(support, "upper_bound", None)
        named = f"[{bounds[0]:g}, {bounds[1]:g}]" if None not in bounds else str(support)
        raise PyrovaeError(
            f"{what} has values in [{lo:g}, {hi:g}] outside the likelihood's support {named}; "
            "rescale the data or choose a likelihood that fits it (e.g. gaussian)"
        )


def _as_features(x: np.ndarray, what: str) -> tuple[Tensor, tuple[int, ...] | None]:
    if x.ndim < 2:
        raise PyrovaeError(
            f"{what} has shape {x.shape}; expected (points, features) or (points, height, width)"
        )
    if len(x) == 0 or 0 in x.shape[1:]:
        raise PyrovaeError(
            f"{what} has shape {x.shape}: no data points to learn from; give an array with at "
            "least one point and one feature"
        )
    if x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        # Channels last, as NumPy and Pillow lay images out: to torch's (C, H, W).
        x = x.transpose(0, 3, 1, 2)
    image_shape = tuple(x.shape[1:]) if x.ndim >= 3 else None
    scale = 255.0 if x.dtype == np.uint8 else 1.0
    t = torch.from_numpy(np.ascontiguousarray(x).reshape(len(x), -1).astype(np.float32) / scale)
    check_data(t, what)
    return t, image_shape


def _split(arrays: dict[str, np.ndarray], validation_size: int | float) -> Splits:
    x, image_shape = _as_features(arrays["x_train"], "training data")
    y = _labels(arrays.get("y_train"), len(x), "training labels")
    if "x_validation" in arrays:  # every split given (the photos' regions)
        return Splits(
            train=x,
            validation=_as_features(arrays["x_validation"], "validation data")[0],
            test=_as_features(arrays["x_test"], "test data")[0],
            train_labels=None,
            validation_labels=None,
            test_labels=None,
            image_shape=image_shape,
        )
    n_val = (
        int(round(validation_size * len(x)))
        if isinstance(validation_size, float)
        else validation_size
    )
    held_out = n_val if "x_test" in arrays else 2 * n_val  # validation, and test if none
    if n_val < 1 or held_out >= len(x):
        raise PyrovaeError(
            f"the training data have {len(x)} points, and data.validation_size = "
            f"{validation_size} holds out {n_val} for validation"
            + ("" if "x_test" in arrays else " and as many for test")
            + (f", which leaves {len(x) - held_out} to train on" if n_val >= 1 else ", none at all")
            + "; give more points or set data.validation_size to a count that fits"
        )
    if "x_test" in arrays:
        x_test, test_shape = _as_features(arrays["x_test"], "test data")
        if x_test.shape[1] != x.shape[1]:
            raise PyrovaeError(
                f"test data has {x_test.shape[1]} features but training data {x.shape[1]}"
            )
        y_test = _labels(arrays.get("y_test"), len(x_test), "test labels")
    else:
        # No test set given: hold out as many points for test as for validation.
        x, x_test = x[:-n_val], x[-n_val:]
        y, y_test = (y[:-n_val], y[-n_val:]) if y is not None else (None, None)
    if not 0 < n_val < len(x):
        raise PyrovaeError(
            f"cannot hold out {n_val} validation points from {len(x)} training points"
        )
    return Splits(
        train=x[:-n_val],
        validation=x[-n_val:],
        test=x_test,
        train_labels=None if y is None else y[:-n_val],
        validation_labels=None if y is None else y[-n_val:],
        test_labels=y_test,
        image_shape=image_shape,
    )


def _labels(y: np.ndarray | None, n: int, what: str) -> Tensor | None:
    if y is None:
        return None
    if y.shape != (n,):
        raise PyrovaeError(f"{what} have shape {y.shape}; expected ({n},), one per point")
    integral = np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.bool_)
    if not integral and np.issubdtype(y.dtype, np.floating):
        integral = bool(np.all(np.isfinite(y)) and np.all(y == np.round(y)))
    if not integral:
        raise PyrovaeError(
            f"{what} have dtype {y.dtype}; labels must be integers (class indices 0..C-1), "
            "e.g. np.unique(labels, return_inverse=True)[1]"
        )
    return torch.from_numpy(y.astype(np.int64))


def _binarize(splits: Splits, mode: str) -> Splits:
    if mode == "none":
        return splits
    lo, hi = splits.train.min().item(), splits.train.max().item()
    if lo < 0 or hi > 1:
        raise PyrovaeError(
            f"data.binarize = {mode!r} needs values in [0, 1] but the training data lie in "
            f'[{lo:g}, {hi:g}]; rescale them or set data.binarize = "none"'
        )
    generator = torch.Generator().manual_seed(BINARIZE_SEED)
    fixed = {
        k: torch.bernoulli(getattr(splits, k), generator=generator) for k in ("validation", "test")
    }
    if mode == "static":
        fixed["train"] = torch.bernoulli(splits.train, generator=generator)
    return replace(splits, dynamic=mode == "dynamic", **fixed)
