"""Checkpoints carry a checksum that every load verifies: a damaged file is refused with a
message that names the intact checkpoint to fall back to. Damage is real bytes overwritten."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest
import torch

from pyrovae.inference import (
    Checkpoint,
    PyrovaeError,
    evaluate_run,
    load_run,
    train_run,
    write_report,
)
from pyrovae.inference.experiment.runs import PREVIOUS

SETTINGS = [
    "model.latent_dim=2",
    "model.decoder.hidden=[16]",
    "guide.encoder.hidden=[16]",
    "train.batch_size=256",
]


def damage(path, offset_share: float = 0.5, length: int = 64) -> None:
    """Overwrites ``length`` bytes in the middle of a file, as a bad disk or a stray write."""
    data = bytearray(path.read_bytes())
    start = int(len(data) * offset_share)
    data[start : start + length] = bytes((b + 1) % 256 for b in data[start : start + length])
    path.write_bytes(bytes(data))


@pytest.fixture
def run_dir(tmp_path):
    out = tmp_path / "run"
    train_run(None, out, overrides=[*SETTINGS, "train.epochs=2"], progress=False)
    return out


def test_a_damaged_checkpoint_is_refused_and_names_the_previous_one(run_dir):
    assert Checkpoint.load(run_dir / "..", name="none.pt") is None
    assert Checkpoint.load(run_dir).epoch == 2
    assert Checkpoint.load(run_dir, name=PREVIOUS).epoch == 1  # kept at the last save
    damage(run_dir / "checkpoint.pt")
    with pytest.raises(PyrovaeError) as error:
        load_run(run_dir)
    message = str(error.value)
    assert "checkpoint.pt is damaged" in message and "previous.pt (epoch 1) is intact" in message
    assert "\n" not in message
    # Resuming is refused in the same words, before anything is written.
    before = (run_dir / "checkpoint.pt").read_bytes()
    with pytest.raises(PyrovaeError, match="is damaged"):
        train_run(None, run_dir, overrides=["train.epochs=3"], resume=True, progress=False)
    assert (run_dir / "checkpoint.pt").read_bytes() == before
    # The fallback the message gives works.
    (run_dir / PREVIOUS).replace(run_dir / "checkpoint.pt")
    assert load_run(run_dir).epoch == 1
    run = train_run(None, run_dir, overrides=["train.epochs=2"], resume=True, progress=False)
    assert run.epoch == 2


@pytest.mark.parametrize("offset_share", [0.05, 0.5, 0.95])
def test_damage_anywhere_in_the_file_is_caught(run_dir, offset_share):
    damage(run_dir / "checkpoint.pt", offset_share)
    with pytest.raises(PyrovaeError, match="is damaged"):
        Checkpoint.load(run_dir)


def test_with_no_intact_checkpoint_left_the_message_says_to_train_again(run_dir):
    damage(run_dir / "checkpoint.pt")
    damage(run_dir / PREVIOUS)
    with pytest.raises(PyrovaeError, match=r"no intact checkpoint is left .*--force"):
        load_run(run_dir)


def test_the_command_line_says_it_in_one_line(run_dir):
    damage(run_dir / "checkpoint.pt")
    done = subprocess.run(
        [sys.executable, "-m", "pyrovae.inference.cli", "evaluate", str(run_dir), "-k", "5"],
        capture_output=True,
        text=True,
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "is damaged" in lines[0], done.stderr


def test_a_checkpoint_written_before_checksums_still_loads(run_dir):
    """Runs trained before format 2 (a plain torch.save of the state) load as they did."""
    state = Checkpoint.load(run_dir).to_state()
    state["format"] = 1
    buffer = io.BytesIO()
    torch.save(state, buffer)
    (run_dir / "checkpoint.pt").write_bytes(buffer.getvalue())
    assert load_run(run_dir).epoch == 2


# --- the data a run was trained on ----------------------------------------------------------


def test_a_run_refuses_data_other_than_its_own(tmp_path, monkeypatch, mnist_like):
    """The run's data file is gone and PYROVAE_DATA points at another file of the same name:
    evaluating, reporting and resuming refuse it, naming both."""
    own, other = tmp_path / "own", tmp_path / "other"
    own.mkdir()
    other.mkdir()
    mnist_like(own / "mnist.npz", train=120, test=20, seed=0)
    mnist_like(other / "mnist.npz", train=120, test=20, seed=1)
    settings = [*SETTINGS, 'data.name="mnist"', "data.validation_size=20", "train.epochs=1"]
    out = tmp_path / "run"
    train_run(None, out, overrides=[*settings, f'data.path="{own}"'], progress=False)
    run = load_run(out)
    assert run.checkpoint.data_sha256 is not None
    assert evaluate_run(run, num_samples=3, limit=4, write=False).num_points == 4
    (own / "mnist.npz").unlink()
    monkeypatch.setenv("PYROVAE_DATA", str(other))
    with pytest.raises(PyrovaeError, match="are not the data .* was trained on") as error:
        evaluate_run(run, num_samples=3, limit=4, write=False)
    assert str(other) in str(error.value) and str(own) in str(error.value)
    with pytest.raises(PyrovaeError, match="are not the data"):
        write_report(out, limit=4, num_samples=3)
    with pytest.raises(PyrovaeError, match="are not the data"):
        train_run(None, out, overrides=["train.epochs=2"], resume=True, progress=False)
    # The same bytes again are the same data, wherever they lie.
    mnist_like(other / "mnist.npz", train=120, test=20, seed=0)
    assert evaluate_run(run, num_samples=3, limit=4, write=False).num_points == 4


def test_a_deleted_spec_is_named_with_how_to_restore_it(tmp_path, capsys):
    from pyrovae.inference.cli import main
    from pyrovae.inference.experiment.runs import restore_spec

    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--epochs", "1", "--no-progress"]) == 0
    original = (run / "spec.toml").read_text()
    (run / "spec.toml").unlink()
    capsys.readouterr()
    assert main(["evaluate", str(run), "-k", "5", "--limit", "5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "spec.toml is missing" in err[0] and "restore_spec" in err[0]
    assert restore_spec(run) == run / "spec.toml"
    assert (run / "spec.toml").read_text() == original
    with pytest.raises(PyrovaeError, match="exists; move it away"):
        restore_spec(run)
    assert main(["evaluate", str(run), "-k", "5", "--limit", "5"]) == 0


def test_a_run_directory_moves_once_and_its_users_follow(tmp_path):
    """Checkpointing and TensorBoard share the RunDirectory of a staged run: after the
    promotion they write where the run is, with no callback repointing another."""
    from pyrovae.inference.experiment.callbacks import Checkpointing
    from pyrovae.inference.experiment.runs import RunDirectory

    final = tmp_path / "run"
    final.mkdir()
    (final / "old.txt").write_text("the run being replaced")
    staging = tmp_path / ".run.partial-1"
    staging.mkdir()
    directory = RunDirectory(staging, final)
    checkpointing = Checkpointing(directory)
    assert directory.staged and checkpointing.run_dir == staging
    assert directory.tensorboard == staging / "tensorboard"
    (staging / "new.txt").write_text("the new run")
    directory.promote()
    assert not directory.staged and checkpointing.run_dir == final
    assert directory.tensorboard == final / "tensorboard"
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    directory.promote()  # once only
    assert (final / "new.txt").is_file()
