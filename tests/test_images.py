"""Images as data: folders of PNG / JPEG files (ImageFolder layout), CIFAR-10's python
batches, patches of scikit-learn's photos; colour end to end through the command line."""

from __future__ import annotations

import base64
import io
import json
import math
import pickle
import re

import numpy as np
import pytest
import torch
from PIL import Image

from pyrovae.inference.cli import main
from pyrovae.inference.errors import PyrovaeError
from pyrovae.inference.experiment.data import load_data
from pyrovae.inference.experiment.images import photo_patch_positions
from pyrovae.inference.experiment.runs import load_run, load_run_data
from pyrovae.inference.reporting.plots import image_grid

HEIGHT, WIDTH = 6, 5


def write_images(folder, count: int, mode: str = "RGB", low: int = 0, high: int = 256, seed=0):
    """``count`` random PNGs of HEIGHT x WIDTH in ``folder``, pixel levels in [low, high);
    returns their arrays by file name."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (HEIGHT, WIDTH, 3) if mode == "RGB" else (HEIGHT, WIDTH)
    arrays = {}
    for i in range(count):
        array = rng.integers(low, high, shape, dtype=np.uint8)
        Image.fromarray(array, mode).save(folder / f"{i:02d}.png")
        arrays[f"{i:02d}.png"] = array
    return arrays


@pytest.fixture
def classes(tmp_path):
    """20 RGB images in two classes: ``cat`` dark (levels below 100), ``dog`` bright."""
    root = tmp_path / "pets"
    write_images(root / "dog", 10, low=156, seed=1)
    write_images(root / "cat", 10, high=100, seed=2)
    return root


def rows_of(arrays: dict) -> set[bytes]:
    """Each image as the row the data set should hold: (C, H, W) flattened, k / 255."""
    rows = set()
    for a in arrays.values():
        chw = a.transpose(2, 0, 1) if a.ndim == 3 else a[None]
        rows.add((torch.from_numpy(chw.reshape(-1).astype(np.float32)) / 255).numpy().tobytes())
    return rows


def test_class_folders_give_colour_images_and_sorted_labels(tmp_path):
    root = tmp_path / "pets"
    dogs = write_images(root / "dog", 10, low=156, seed=1)
    cats = write_images(root / "cat", 10, high=100, seed=2)
    data = load_data(str(root))
    assert data.image_shape == (3, HEIGHT, WIDTH) and data.source == root.resolve()
    assert (len(data.train), len(data.validation), len(data.test)) == (16, 2, 2)
    x = torch.cat([data.train, data.validation, data.test])
    y = torch.cat([data.train_labels, data.validation_labels, data.test_labels])
    # Each row is one image's 8-bit levels, channel-major; classes in sorted order, cat = 0.
    assert {row.numpy().tobytes() for row in x} == rows_of(dogs) | rows_of(cats)
    assert ((x.max(1).values < 100 / 255) == (y == 0)).all()
    assert torch.equal((x * 255).round(), x * 255)
    # The split is seeded: the same folder splits the same way, to the same fingerprint.
    again = load_data(str(root))
    assert again.fingerprint() == data.fingerprint()
    assert torch.equal(again.test, data.test)


def test_a_flat_grey_folder_is_unlabelled_and_keeps_one_channel(tmp_path):
    grey = write_images(tmp_path / "grey", 12, mode="L")
    data = load_data(str(tmp_path / "grey"), validation_size=2)
    assert data.image_shape == (1, HEIGHT, WIDTH)
    assert data.train_labels is None and data.test_labels is None
    x = torch.cat([data.train, data.validation, data.test])
    assert {row.numpy().tobytes() for row in x} == rows_of(grey)


def test_channels_are_as_found_or_as_asked(tmp_path):
    folder = tmp_path / "mixed"
    write_images(folder, 6, mode="RGB")
    (folder / "thumbnails").mkdir()  # a subfolder without images is not a class
    grey = {f"g{k}": v for k, v in write_images(tmp_path / "g", 4, mode="L", seed=3).items()}
    for name, array in grey.items():
        Image.fromarray(array, "L").save(folder / f"{name}.png")
    data = load_data(str(folder), validation_size=1)
    assert data.image_shape == (3, HEIGHT, WIDTH)  # some colour: all RGB, grey repeated
    x = torch.cat([data.train, data.validation, data.test]).reshape(-1, 3, HEIGHT, WIDTH)
    repeated = (x[:, 0] == x[:, 1]).all((1, 2)) & (x[:, 1] == x[:, 2]).all((1, 2))
    assert int(repeated.sum()) == 4
    as_grey = load_data(str(folder), validation_size=1, channels=1)
    assert as_grey.image_shape == (1, HEIGHT, WIDTH)
    luma = load_data(str(tmp_path / "g"), validation_size=1, channels=3)
    assert luma.image_shape == (3, HEIGHT, WIDTH)


def test_image_size_scales_to_cover_and_crops_the_centre(tmp_path):
    """A 40 x 20 image, red left and right quarters, blue middle, and a 10 x 10 one: at
    image_size 10 the first is scaled to 20 x 10 and its blue middle kept."""
    folder = tmp_path / "sizes"
    folder.mkdir()
    wide = np.zeros((20, 40, 3), dtype=np.uint8)
    wide[:, :, 2] = 255
    wide[:, :10] = wide[:, 30:] = (255, 0, 0)
    Image.fromarray(wide).save(folder / "a.png")
    Image.fromarray(np.full((10, 10, 3), 128, dtype=np.uint8)).save(folder / "b.png")
    Image.fromarray(np.full((10, 10, 3), 64, dtype=np.uint8)).save(folder / "c.png")
    data = load_data(str(folder), validation_size=1, image_size=10)
    assert data.image_shape == (3, 10, 10)
    x = torch.cat([data.train, data.validation, data.test]).reshape(-1, 3, 10, 10)
    blue = [img for img in x if img[2].mean() > 0.9]
    assert len(blue) == 1 and blue[0][0].max() < 0.1  # no red left in the centre crop
    non_square = load_data(str(folder), validation_size=1, image_size=[4, 8])
    assert non_square.image_shape == (3, 4, 8)


def test_celeba_layout_jpegs_are_read_at_the_asked_size(tmp_path):
    """CelebA's ``img_align_celeba/``: a flat folder of 178 x 218 JPEGs, unlabelled."""
    folder = tmp_path / "img_align_celeba"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        face = rng.integers(0, 256, (218, 178, 3), dtype=np.uint8)
        Image.fromarray(face).save(folder / f"{i + 1:06d}.jpg", quality=90)
    data = load_data(str(folder), validation_size=1, image_size=16)
    assert data.image_shape == (3, 16, 16) and data.train_labels is None
    assert len(data.train) == 3 and torch.equal((data.train * 255).round(), data.train * 255)


def write_cifar(folder, per_batch: int = 4):
    """A fake ``cifar-10-batches-py``: the real layout (pickled dicts of ``data`` rows of
    3072 bytes, R then G then B planes, and ``labels``), with ``per_batch`` images each."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"batch_label": name.encode(),
            b"labels": [int(v) for v in rng.integers(0, 10, per_batch)],
            b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            b"filenames": [b"x.png"] * per_batch,
        }
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
        batches[name] = batch
    return batches


def test_cifar10_python_batches(tmp_path, monkeypatch):
    batches = write_cifar(tmp_path / "cifar-10-batches-py")
    monkeypatch.delenv("PYROVAE_DATA", raising=False)
    data = load_data("cifar-10", path=str(tmp_path), validation_size=2)
    assert data.image_shape == (3, 32, 32) and data.source == (tmp_path / "cifar-10-batches-py")
    assert (len(data.train), len(data.validation), len(data.test)) == (18, 2, 4)
    test = batches["test_batch"]
    torch.testing.assert_close(data.test, torch.from_numpy(test[b"data"]).float() / 255)
    assert data.test_labels.tolist() == test[b"labels"]
    # Row-major planes: the first 1024 values of a row are the red channel of (3, 32, 32).
    red = data.test.reshape(-1, 3, 32, 32)[0, 0]
    assert torch.equal(red.flatten(), data.test[0, :1024])


def test_cifar10_refuses_a_pickle_that_calls_anything_else(tmp_path, monkeypatch):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder)

    class Sneaky:
        def __reduce__(self):
            import os

            return (os.getcwd, ())

    (folder / "test_batch").write_bytes(pickle.dumps({b"data": Sneaky()}, protocol=2))
    monkeypatch.delenv("PYROVAE_DATA", raising=False)
    with pytest.raises(PyrovaeError, match="test_batch is not a CIFAR-10 python batch"):
        load_data("cifar-10", path=str(tmp_path), validation_size=2)
    with pytest.raises(PyrovaeError, match="cifar-10 not found.*download=True"):
        load_data("cifar-10", path=str(tmp_path / "nowhere"))


def test_photo_patches_keep_test_pixels_out_of_training():
    """No test (or validation) patch shares a pixel with a training patch; each split's
    patches are the photo's pixels at their positions; the regions are seeded."""
    positions = photo_patch_positions()
    assert {k: len(v) for k, v in positions.items()} == {
        "train": 84 * 81,
        "validation": 18 * 9,
        "test": 18 * 9,
    }

    def covered(rows: np.ndarray) -> np.ndarray:
        mask = np.zeros((2, 427, 640), dtype=bool)
        for photo, top, left in rows:
            mask[photo, top : top + 32, left : left + 32] = True
        return mask

    train = covered(positions["train"])
    for split in ("validation", "test"):
        assert not (train & covered(positions[split])).any()
    assert not (covered(positions["validation"]) & covered(positions["test"])).any()
    data = load_data("sklearn-photos")
    assert data.image_shape == (3, 32, 32) and data.source is None
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    for split in ("train", "test"):
        x = getattr(data, split).reshape(-1, 3, 32, 32)
        for i in (0, len(x) - 1):
            photo, top, left = positions[split][i]
            patch = photos[photo][top : top + 32, left : left + 32].transpose(2, 0, 1)
            torch.testing.assert_close(x[i], torch.from_numpy(patch.copy()).float() / 255)
    assert load_data("sklearn-photos", channels=1, image_size=16).image_shape == (1, 16, 16)


# --- from the command line --------------------------------------------------------------

CONV = [
    "--set",
    'guide.encoder={ kind = "diagonal_normal", network = "conv", hidden = [4, 8] }',
    "--set",
    'model.decoder={ kind = "feedforward", network = "conv", hidden = [8, 4] }',
    "--set",
    "model.latent_dim=3",
    "--set",
    "train.batch_size=8",
    "--no-progress",
]


def one_line_error(capsys, code, *fragments):
    err = capsys.readouterr().err
    err = "".join(line for line in err.splitlines(True) if "pyrovae: warning:" not in line)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyrovae: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in err


def embedded_pngs(page: str) -> list[Image.Image]:
    found = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    return [Image.open(io.BytesIO(base64.b64decode(b))) for b in found]


def test_a_colour_folder_trains_evaluates_samples_and_reports(classes, tmp_path, capsys):
    run = tmp_path / "run"
    likelihood = 'model.likelihood={ kind = "discretized_logistic_mixture", components = 2 }'
    args = ["train", "--out", str(run), "--epochs", "2", "--set", f"data.name='{classes}'"]
    # Two latent dimensions: the report draws the decoded latent grid too.
    assert main([*args, "--set", likelihood, *CONV, "--set", "model.latent_dim=2"]) == 0
    loaded = load_run(run)
    assert loaded.image_shape == (3, HEIGHT, WIDTH)
    assert loaded.spec.data.path == str(classes.resolve())
    capsys.readouterr()
    assert main(["evaluate", str(run), "-k", "20", "--json"]) == 0
    saved = json.loads(capsys.readouterr().out)
    # The test split is the run's: 2 of the 20 images; bits/dim over C * H * W values.
    features = 3 * HEIGHT * WIDTH
    assert saved["points"] == 2 and saved["features"] == features
    assert saved["bits_per_dim_levels"] is None
    assert saved["bits_per_dim"] == pytest.approx(-saved["log_px"] / (features * math.log(2)))
    assert main(["sample", str(run), "-n", "9"]) == 0
    with Image.open(run / "samples.png") as grid:
        assert grid.mode in ("RGB", "RGBA")
        pixels = np.asarray(grid.convert("RGB"), dtype=np.int64)
    assert (pixels[..., 0] != pixels[..., 1]).any()  # colour, not grey
    assert main(["report", str(run), "-k", "10", "--limit", "2"]) == 0
    page = (run / "report.html").read_text()
    assert "<h2>Reconstructions</h2>" in page
    coloured = 0
    for png in embedded_pngs(page):
        rgb = np.asarray(png.convert("RGB"), dtype=np.int64)
        coloured += int((np.abs(rgb[..., 0] - rgb[..., 2]) > 30).mean() > 0.01)
    assert coloured >= 4  # reconstructions, samples, traversals, latent grid in colour
    # The run keeps the images it was trained on, in split order: images added to the folder
    # later leave its splits as they were, so it evaluates the same test images.
    listing = json.loads((run / "images.json").read_text())
    assert len(listing["files"]) == 20 and listing["classes"] == ["cat", "dog"]
    data = load_run_data(loaded)
    labels = torch.cat([data.train_labels, data.validation_labels, data.test_labels])
    assert [f.split("/")[0] for f in listing["files"]] == [["cat", "dog"][y] for y in labels]
    for name in ("z.png", "zz.png"):
        Image.fromarray(np.zeros((HEIGHT, WIDTH, 3), np.uint8)).save(classes / "cat" / name)
    capsys.readouterr()
    assert main(["evaluate", str(run), "-k", "20", "--json", "-o", str(tmp_path / "e.json")]) == 0
    assert json.loads(capsys.readouterr().out)["per_point"] == saved["per_point"]
    # ... and training resumes on them.
    assert main(["train", "--resume", str(run), "--epochs", "3"]) == 0
    assert load_run(run).epoch == 3
    # An image of the run that is gone is one line naming it; nothing is written.
    gone = classes / listing["files"][-1]
    gone.unlink()
    before = (run / "evaluation.json").read_bytes()
    one_line_error(capsys, main(["evaluate", str(run), "-k", "5", "--force"]), str(gone), "gone")
    assert (run / "evaluation.json").read_bytes() == before
    # A damaged listing is one line too.
    (run / "images.json").write_text("{")
    one_line_error(capsys, main(["evaluate", str(run), "-k", "5", "--force"]), "images.json")


def test_a_grey_folder_trains_and_its_data_reload(tmp_path, capsys):
    write_images(tmp_path / "grey" / "a", 10, mode="L", high=128, seed=3)
    write_images(tmp_path / "grey" / "b", 10, mode="L", low=128, seed=4)
    run = tmp_path / "grey-run"
    args = ["train", "--out", str(run), "--epochs", "1", "--set", f"data.name='{tmp_path}/grey'"]
    likelihood = 'model.likelihood={ kind = "discretized_logistic" }'
    assert main([*args, "--set", likelihood, *CONV]) == 0
    loaded = load_run(run)
    assert loaded.image_shape == (1, HEIGHT, WIDTH)
    data = load_data(str(tmp_path / "grey"))
    assert torch.equal(load_run_data(loaded).test, data.test)
    assert set(data.train_labels.tolist()) == {0, 1}
    capsys.readouterr()
    assert main(["evaluate", str(run), "-k", "20", "--json"]) == 0
    saved = json.loads(capsys.readouterr().out)
    assert saved["points"] == 2 and saved["features"] == HEIGHT * WIDTH
    assert saved["bits_per_dim"] == pytest.approx(-saved["log_px"] / (HEIGHT * WIDTH * math.log(2)))
    assert main(["sample", str(run), "-n", "4", "-o", str(tmp_path / "s.png")]) == 0
    assert main(["report", str(run), "-k", "10", "--limit", "2"]) == 0
    assert "<h2>Latent traversals</h2>" in (run / "report.html").read_text()


def test_tensorboard_draws_colour_images(classes, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pyrovae.inference.experiment.workflow import train_run

    overrides = [f"data.name='{classes}'", 'train.log="tensorboard"', "train.epochs=1"]
    overrides += [CONV[i + 1] for i in range(0, len(CONV) - 1, 2)]
    train_run(None, tmp_path / "run", overrides=overrides, progress=False)
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload()
    assert {"samples", "inputs_and_reconstructions"} <= set(events.Tags()["images"])
    (pairs,) = events.Images("inputs_and_reconstructions")
    with Image.open(io.BytesIO(pairs.encoded_image_string)) as grid:
        rgb = np.asarray(grid.convert("RGB"), dtype=np.int64)
    assert (np.abs(rgb[..., 0] - rgb[..., 2]) > 30).mean() > 0.01  # the inputs' colours


def truncated_jpeg(folder):
    write_images(folder, 3)
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((HEIGHT, WIDTH, 3), dtype=np.uint8)).save(buffer, "JPEG")
    (folder / "broken.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return "broken.jpg", "not a readable image"


def not_an_image(folder):
    write_images(folder, 3)
    (folder / "notes.png").write_text("not a picture")
    return "notes.png", "not a readable image"


def mixed_sizes(folder):
    write_images(folder, 3)
    Image.fromarray(np.zeros((7, 7, 3), dtype=np.uint8)).save(folder / "big.png")
    return "big.png", "data.image_size"


def empty(folder):
    folder.mkdir()
    (folder / "readme.txt").write_text("images go here")
    return str(folder), "holds no images"


def loose_and_classes(folder):
    write_images(folder / "cat", 3)
    write_images(folder, 2)
    return "both images", "class folder"


def empty_class(folder):
    write_images(folder / "cat", 3)
    (folder / "dog").mkdir(parents=True)
    (folder / "dog" / "notes.txt").write_text("")
    return "dog", "holds no images"


@pytest.mark.parametrize(
    "make", [truncated_jpeg, not_an_image, mixed_sizes, empty, loose_and_classes, empty_class]
)
def test_bad_folders_are_one_line_and_exit_2(tmp_path, capsys, make):
    folder = tmp_path / "images"
    fragments = make(folder)
    args = ["train", "--out", str(tmp_path / "run"), "--set", f"data.name='{folder}'", *CONV]
    one_line_error(capsys, main(args), *fragments)
    assert not (tmp_path / "run").exists()
    assert not list(tmp_path.glob(".run*"))  # nothing staged either


@pytest.mark.parametrize(
    "setting, fragments",
    [
        ("data.channels=4", ["data.channels must be 1 (greyscale) or 3 (RGB), got 4"]),
        ("data.image_size=0", ["data.image_size must be a side in pixels"]),
        ("data.image_size=[4, 5, 6]", ["data.image_size must be a side in pixels"]),
    ],
)
def test_bad_image_options_are_one_line_and_exit_2(tmp_path, capsys, classes, setting, fragments):
    args = ["train", "--out", str(tmp_path / "run"), "--set", f"data.name='{classes}'"]
    one_line_error(capsys, main([*args, "--set", setting, *CONV]), *fragments)
    assert not (tmp_path / "run").exists()


def test_image_options_apply_only_to_images(tmp_path, capsys):
    args = ["train", "--out", str(tmp_path / "run"), "--set", "data.image_size=8"]
    one_line_error(capsys, main(args), "apply to a folder of images", "'digits'")
    missing = ["train", "--out", str(tmp_path / "run"), "--set", f"data.name='{tmp_path}/nope'"]
    one_line_error(capsys, main(missing), "unknown data.name", "no file or folder")


def test_rgb_grids_keep_each_tile_in_place():
    """Six 2 x 2 tiles of (3, 2, 2), three to a row: tile i has red i / 5, green 1 - i / 5."""
    i = torch.arange(6.0)[:, None, None, None] / 5
    tiles = torch.cat(
        [i.expand(6, 1, 2, 2), (1 - i).expand(6, 1, 2, 2), torch.zeros(6, 1, 2, 2)], 1
    )
    grid = image_grid(tiles.reshape(6, -1), (3, 2, 2), ncol=3)
    assert grid.shape == (4, 6, 3)
    assert grid[0, 0].tolist() == pytest.approx([0, 1, 0])
    assert grid[0, 2].tolist() == pytest.approx([0.2, 0.8, 0])
    assert grid[3, 5].tolist() == pytest.approx([1.0, 0.0, 0])
    assert image_grid(tiles[:, :1].reshape(6, -1), (1, 2, 2), ncol=3).shape == (4, 6)


@pytest.mark.parametrize("layout", ["channels last", "channels first"])
def test_image_arrays_in_either_layout_train_and_sample(layout, tmp_path, capsys):
    """A .npy of (N, H, W, 3), as NumPy and Pillow lay images out, is read as (N, 3, H, W);
    either way the run samples an RGB grid."""
    images = np.random.default_rng(0).random((300, 8, 6, 3)).astype(np.float32)
    if layout == "channels first":
        images = images.transpose(0, 3, 1, 2)
    np.save(tmp_path / "x.npy", images)
    data = load_data(str(tmp_path / "x.npy"), "none")
    assert data.image_shape == (3, 8, 6)
    first = images.transpose(0, 3, 1, 2) if layout == "channels last" else images
    together = torch.cat([data.train, data.validation, data.test]).reshape(-1, 3, 8, 6)
    for channel in range(3):  # each channel's pixels stay that channel's
        torch.testing.assert_close(
            together[:, channel].flatten().sort().values,
            torch.from_numpy(first[:, channel]).flatten().sort().values,
        )
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--set", f'data.name="{tmp_path / "x.npy"}"',
                 "--set", 'model.likelihood={kind="continuous_bernoulli"}',
                 "--set", "train.epochs=1", "--no-progress"]) == 0  # fmt: skip
    assert main(["sample", str(run), "-n", "4"]) == 0
    assert (run / "samples.png").is_file()
