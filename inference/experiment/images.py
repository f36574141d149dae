"""Image data sets: a folder of image files (torchvision's ``ImageFolder`` layout), 32x32
patches of scikit-learn's two bundled photos, and CIFAR-10's python batches.

Each reader returns uint8 arrays ``(N, C, H, W)`` by Keras name (``x_train``, ``y_train``,
...), as :mod:`.sources` does for the other data sets; :mod:`.data` scales them to
``k / 255``, checks and splits them. Everything is read and checked before anything is
written: a file that is not an image, a truncated one, or sizes that differ without
``data.image_size`` stop with one line naming the file.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath

import numpy as np

from pyrovae.inference.errors import PyrovaeError

__all__ = [
    "CHANNELS",
    "IMAGE_EXTENSIONS",
    "SPLIT_SEED",
    "check_image_options",
    "list_images",
    "photo_patch_positions",
    "read_cifar10",
    "read_image_folder",
    "read_sklearn_photos",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
"""The files a folder data set reads (torchvision's ``ImageFolder`` list, less ``.pgm``-like
oddities Pillow also reads); other files are passed over."""

CHANNELS = (1, 3)
"""Values of ``data.channels``: greyscale or RGB."""

SPLIT_SEED = 0
"""Seed of the shuffle that splits a folder into training, validation and test images, and
of the choice of test regions of the photos."""

PHOTO_PATCH = 32
"""The side of a photo patch when ``data.image_size`` is not set."""


def check_image_options(image_size: int | Sequence[int] | None, channels: int | None) -> None:
    """Checks ``data.image_size`` (a side, or ``[height, width]``) and ``data.channels``.

    Raises:
        PyrovaeError: one line naming the key and the values it takes.
    """
    if channels is not None and channels not in CHANNELS:
        raise PyrovaeError(
            f"data.channels must be 1 (greyscale) or 3 (RGB), got {channels!r}; leave it unset "
            "to keep the images' own"
        )
    if image_size is not None:
        _size(image_size)


def _size(image_size: int | Sequence[int]) -> tuple[int, int]:
    """``(height, width)`` of ``data.image_size``."""
    sides = [image_size] if isinstance(image_size, int) else list(image_size)
    if len(sides) == 1:
        sides = sides * 2
    if len(sides) != 2 or any(
        isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sides
    ):
        raise PyrovaeError(
            "data.image_size must be a side in pixels (e.g. 32) or [height, width], got "
            f"{image_size!r}"
        )
    return sides[0], sides[1]


def list_images(folder: Path) -> tuple[list[Path], list[int] | None, list[str]]:
    """The image files of a folder, sorted, with their labels in ``ImageFolder``'s layout.

    A folder whose subfolders hold images is labelled: each subfolder is a class (indices in
    sorted order of the class names), its images found at any depth. A folder of images
    alone is unlabelled. Hidden files and folders (``.name``) and files of other extensions
    are passed over.

    Returns:
        ``(files, labels, classes)``: labels and classes are None and ``[]`` without classes.

    Raises:
        PyrovaeError: the folder does not exist, holds no images, or mixes loose images with
            class subfolders, or a class subfolder holds none.
    """
    if not folder.is_dir():
        raise PyrovaeError(f"image folder {folder} does not exist; check data.name")
    loose = [f for f in sorted(folder.iterdir()) if _is_image(f)]
    subfolders = [d for d in sorted(folder.iterdir()) if d.is_dir() and not d.name.startswith(".")]
    found = {d: _images_under(d) for d in subfolders}
    classes = [d for d in subfolders if found[d]]
    if not classes:
        if not loose:
            raise PyrovaeError(
                f"{folder} holds no images ({', '.join(IMAGE_EXTENSIONS)}); put the images in "
                "it, or one subfolder per class"
            )
        return loose, None, []
    if loose:
        raise PyrovaeError(
            f"{folder} holds both images ({loose[0].name}) and class folders "
            f"({classes[0].name}/); put every image in a class folder, or none in any"
        )
    empty = [d for d in subfolders if not found[d]]
    if empty:
        raise PyrovaeError(
            f"class folder {empty[0]} holds no images, and its siblings do; add images to it or "
            "remove it"
        )
    files, labels = [], []
    for index, d in enumerate(classes):
        files += found[d]
        labels += [index] * len(found[d])
    return files, labels, [d.name for d in classes]


def _images_under(folder: Path) -> list[Path]:
    files = []
    for root, dirs, names in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files += [Path(root) / n for n in sorted(names) if _is_image(Path(root) / n)]
    return files


def _is_image(path: Path) -> bool:
    return (
        not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()
    )


def read_image_folder(
    folder: Path,
    image_size: int | Sequence[int] | None = None,
    channels: int | None = None,
    listing: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, np.ndarray]:
    """Every image of a folder as uint8 ``(N, C, H, W)``, shuffled with :data:`SPLIT_SEED`;
    or, given a ``listing``, the images it names in its order.

    Args:
        folder: the folder (see :func:`list_images` for the layout and the labels).
        image_size: scale each image to cover this size (a side, or ``[height, width]``) and
            centre-crop it (Pillow's ``ImageOps.fit``, Lanczos); None keeps the images' own
            size, which must then be the same for all.
        channels: 1 (greyscale) or 3 (RGB); None keeps what the images are, RGB when some
            are colour and some grey. Alpha is dropped.
        listing: ``{"files": [...], "classes": [...]}`` as this function returned them for
            a run (paths relative to the folder, in the shuffled order; class names): the
            same images in the same order, labelled as then, so that a run's splits stay
            its own when images are added to the folder later.

    Returns:
        ``x_train`` and, for class folders, ``y_train``; :func:`~.data.load_data` holds out
        validation and test images from the end of the shuffled order. ``files`` and
        ``classes`` are the listing of what was read (string arrays).

    Raises:
        PyrovaeError: a bad folder (see :func:`list_images`), a file that is not an image or
            is damaged, sizes that differ without ``image_size``, or an image of the listing
            that is gone.
    """
    check_image_options(image_size, channels)
    from PIL import Image

    if listing is None:
        files, labels, classes = list_images(folder)
        order = np.random.default_rng(SPLIT_SEED).permutation(len(files))
    else:
        files, labels, classes = _listed(folder, listing)
        order = np.arange(len(files))
    size = None if image_size is None else _size(image_size)
    modes, shapes = [], {}
    for file in files:  # headers only: sizes and modes are checked before decoding
        try:
            with Image.open(file) as image:
                modes.append(image.mode)
                shapes.setdefault((image.height, image.width), file)
        except Exception as e:  # noqa: BLE001 - whatever the decoder says, the file is bad
            raise _unreadable(file, e) from None
        if size is None and len(shapes) > 1:
            (first, a), (other, b) = list(shapes.items())[:2]
            raise PyrovaeError(
                f"{b} is {other[1]} x {other[0]} pixels (width x height) but {a} is "
                f"{first[1]} x {first[0]}; set "
                "data.image_size to scale and centre-crop every image to one size (e.g. "
                f"data.image_size = {min(first)})"
            )
    grey = [Image.getmodebase(m) == "L" for m in modes]
    if channels is None:
        channels = 1 if all(grey) else 3
    height, width = size if size is not None else next(iter(shapes))
    x = np.empty((len(files), channels, height, width), dtype=np.uint8)
    for i, file in enumerate(files):
        x[i] = _decode(file, channels, size)
    arrays = {
        "x_train": x[order],
        "files": np.array([f.relative_to(folder).as_posix() for f in files])[order],
        "classes": np.array(classes, dtype=str),
    }
    if labels is not None:
        arrays["y_train"] = np.asarray(labels, dtype=np.int64)[order]
    return arrays


def _listed(
    folder: Path, listing: Mapping[str, Sequence[str]]
) -> tuple[list[Path], list[int] | None, list[str]]:
    """The files and labels of a listing (see :func:`read_image_folder`)."""
    if not folder.is_dir():
        raise PyrovaeError(f"image folder {folder} does not exist; check data.name")
    classes = list(listing.get("classes") or [])
    index = {name: i for i, name in enumerate(classes)}
    files, labels = [], []
    for name in listing["files"]:
        relative = PurePosixPath(name)
        file = folder.joinpath(*relative.parts)
        if relative.is_absolute() or ".." in relative.parts or not file.is_file():
            raise PyrovaeError(
                f"{file} is one of the images this run was trained on (its images.json lists "
                "them) and is gone; put it back, or train a new run on the folder as it is now"
            )
        files.append(file)
        if classes:
            labels.append(index[relative.parts[0]])
    return files, labels if classes else None, classes


def _decode(file: Path, channels: int, size: tuple[int, int] | None) -> np.ndarray:
    """One image as uint8 ``(C, H, W)``."""
    from PIL import Image, ImageOps

    mode = "L" if channels == 1 else "RGB"
    try:
        with Image.open(file) as image:
            if size is not None:  # JPEG: decode at a reduced scale that still covers the size
                image.draft(mode, (size[1], size[0]))
            image.load()
            if image.mode.startswith("I;16") or image.mode == "I":
                # 16-bit grey levels to 8-bit ones (Pillow's convert would clip them).
                levels = np.asarray(image, dtype=np.float64) / 257
                image = Image.fromarray(levels.round().clip(0, 255).astype(np.uint8), "L")
            image = image.convert(mode)
            if size is not None:
                image = ImageOps.fit(image, (size[1], size[0]), Image.Resampling.LANCZOS)
            array = np.asarray(image, dtype=np.uint8)
    except Exception as e:  # noqa: BLE001 - whatever the decoder says, the file is bad
        raise _unreadable(file, e) from None
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def _unreadable(file: Path, error: Exception) -> PyrovaeError:
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return PyrovaeError(
        f"{file} is not a readable image ({reason}); remove it from the folder or replace it "
        "with an intact PNG or JPEG"
    )


def photo_patch_positions(
    patch: tuple[int, int] = (PHOTO_PATCH, PHOTO_PATCH),
    shapes: Sequence[tuple[int, int]] = ((427, 640), (427, 640)),
) -> dict[str, np.ndarray]:
    """Where the patches of each split lie in the photos: rows ``(photo, top, left)``.

    Each photo is cut into regions of twice the patch's size (a centred grid, the margins
    left out); a permutation seeded with :data:`SPLIT_SEED` gives 15% of the regions to test,
    15% to validation and the rest to training. Training patches lie at every eighth of a
    patch inside training regions (shifted copies, as data augmentation would make them);
    validation and test patches at every half patch inside theirs. A patch never leaves its
    region, so no test patch shares a pixel with a training one.

    Args:
        patch: ``(height, width)`` of a patch.
        shapes: ``(height, width)`` of each photo.
    """
    height, width = patch
    regions = []
    for photo, (rows, cols) in enumerate(shapes):
        n_rows, n_cols = rows // (2 * height), cols // (2 * width)
        top, left = (rows - n_rows * 2 * height) // 2, (cols - n_cols * 2 * width) // 2
        regions += [
            (photo, top + 2 * height * r, left + 2 * width * c)
            for r in range(n_rows)
            for c in range(n_cols)
        ]
    order = np.random.default_rng(SPLIT_SEED).permutation(len(regions))
    held_out = max(1, round(0.15 * len(regions)))
    parts = {
        "train": order[2 * held_out :],
        "validation": order[held_out : 2 * held_out],
        "test": order[:held_out],
    }
    positions = {}
    for split, picked in parts.items():
        fraction = 8 if split == "train" else 2
        steps = (max(1, height // fraction), max(1, width // fraction))
        offsets = [
            (dy, dx)
            for dy in range(0, height + 1, steps[0])
            for dx in range(0, width + 1, steps[1])
        ]
        corners = [regions[i] for i in sorted(picked)]
        positions[split] = np.array(
            [(photo, top + dy, left + dx) for photo, top, left in corners for dy, dx in offsets],
            dtype=np.int64,
        ).reshape(-1, 3)
    return positions


def read_sklearn_photos(
    image_size: int | Sequence[int] | None = None, channels: int | None = None
) -> dict[str, np.ndarray]:
    """Patches of scikit-learn's two bundled colour photos (``load_sample_images``: a
    Chinese temple and a flower, 427 x 640 each): a small natural-image data set that needs
    no download.

    Args:
        image_size: the patch size, a side or ``[height, width]``; default 32.
        channels: 3 (RGB, the default) or 1 (Pillow's luma).

    Returns:
        ``x_train``, ``x_validation`` and ``x_test`` as uint8 ``(N, C, H, W)``, cut at
        :func:`photo_patch_positions`.
    """
    check_image_options(image_size, channels)
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    if channels == 1:
        photos = [np.asarray(Image.fromarray(p).convert("L"))[..., None] for p in photos]
    patch = (PHOTO_PATCH, PHOTO_PATCH) if image_size is None else _size(image_size)
    positions = photo_patch_positions(patch, [p.shape[:2] for p in photos])
    height, width = patch
    arrays = {}
    for split, rows in positions.items():
        if not len(rows):
            raise PyrovaeError(
                f"data.image_size = {image_size!r} leaves no {split} patches in the photos "
                "(427 x 640 pixels, cut into regions of twice the patch); choose a smaller size"
            )
        cut = [photos[p][top : top + height, left : left + width] for p, top, left in rows]
        arrays[f"x_{split}"] = np.stack(cut).transpose(0, 3, 1, 2).copy()
    return arrays


_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
_CIFAR_TEST = "test_batch"


def read_cifar10(path: str | None) -> tuple[dict[str, np.ndarray], Path]:
    """CIFAR-10 from the python batches torchvision downloads (``cifar-10-batches-py/``:
    ``data_batch_1`` .. ``data_batch_5``, ``test_batch``), looked for in ``path`` (the
    folder itself or its parent), then ``$PYROVAE_DATA``.

    Returns:
        The arrays (``x_train`` 50,000 and ``x_test`` 10,000 uint8 ``(N, 3, 32, 32)``, with
        their labels) and the folder they came from.

    Raises:
        PyrovaeError: no such folder, or a batch that is not a CIFAR-10 batch.
    """
    candidates = [Path(path)] if path else []
    if os.environ.get("PYROVAE_DATA"):
        candidates.append(Path(os.environ["PYROVAE_DATA"]))
    for candidate in candidates:
        for folder in (candidate, candidate / _CIFAR_DIR):
            if all((folder / name).is_file() for name in [*_CIFAR_TRAIN, _CIFAR_TEST]):
                train = [_cifar_batch(folder / name) for name in _CIFAR_TRAIN]
                x_test, y_test = _cifar_batch(folder / _CIFAR_TEST)
                arrays = {
                    "x_train": np.concatenate([x for x, _ in train]),
                    "y_train": np.concatenate([y for _, y in train]),
                    "x_test": x_test,
                    "y_test": y_test,
                }
                return arrays, folder.resolve()
    where = ", ".join(map(str, candidates)) or "nowhere (no data.path, PYROVAE_DATA unset)"
    raise PyrovaeError(
        f"cifar-10 not found: looked in {where}; set data.path or PYROVAE_DATA to the folder "
        f"holding {_CIFAR_DIR}/ (torchvision.datasets.CIFAR10(root, download=True) writes it)"
    )


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists and NumPy arrays only: a CIFAR batch is a pickle, and a pickle
    can name any callable; these are the only ones a batch needs."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a CIFAR batch")


def _cifar_batch(file: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(file, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
        return data.reshape(-1, 3, 32, 32), labels.reshape(len(data))
    except Exception as e:  # noqa: BLE001 - any failure means the file is not a batch
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise PyrovaeError(
            f"{file} is not a CIFAR-10 python batch ({reason}); download the set again"
        ) from None
