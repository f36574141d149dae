"""A run directory has one writer at a time: a second process that would write into it stops
with one line and exit 2, and a holder killed outright leaves nothing stuck. Real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pyrovae.inference import Checkpoint, PyrovaeError
from pyrovae.inference.experiment.runs import MARKER, lock_file, run_lock, stage_run
from pyrovae.inference.experiment.spec import load_spec

SMALL = [
    "--set",
    "model.latent_dim=2",
    "--set",
    "model.decoder.hidden=[8]",
    "--set",
    "guide.encoder.hidden=[8]",
    "--set",
    "train.batch_size=64",
    "--no-progress",
]


def pyrovae(*args: str, cwd: Path) -> list[str]:
    return [sys.executable, "-m", "pyrovae.inference.cli", *args]


def start_training(out: Path, epochs: int) -> subprocess.Popen:
    return subprocess.Popen(
        pyrovae("train", "--out", str(out), "--epochs", str(epochs), *SMALL, cwd=out.parent),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def wait_for_holder(out: Path, pid: int, timeout: float = 120.0) -> None:
    """Waits until process ``pid`` holds the lock of ``out`` (its pid is in the lock file)."""
    lock = lock_file(out)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if lock.is_file() and lock.read_text().strip() == str(pid):
            return
        time.sleep(0.1)
    pytest.fail(f"process {pid} did not take the lock of {out} in {timeout} s")


def one_line(done: subprocess.CompletedProcess) -> str:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and lines[0].startswith("pyrovae: error: "), done.stderr
    return lines[0]


def test_a_second_training_into_the_same_run_is_refused_and_a_killed_holder_frees_it(
    tmp_path,
):
    out = tmp_path / "run"
    first = start_training(out, epochs=1000)
    try:
        wait_for_holder(out, first.pid)
        for extra in ([], ["--force"]):
            done = subprocess.run(
                pyrovae("train", "--out", str(out), "--epochs", "1", *SMALL, *extra, cwd=tmp_path),
                capture_output=True,
                text=True,
            )
            line = one_line(done)
            # Without --force a run there already is reason enough (it may have been
            # promoted by now); with --force only the lock stops it.
            assert f"in use by another pyrovae process (pid {first.pid})" in line or (
                not extra and "already exists" in line
            )
        # Resuming it is writing into it too.
        while not (out / "checkpoint.pt").is_file():
            time.sleep(0.1)
        done = subprocess.run(
            pyrovae("train", "--resume", str(out), "--epochs", "2000", cwd=tmp_path),
            capture_output=True,
            text=True,
        )
        assert "in use by another pyrovae process" in one_line(done)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # The kernel released the lock with the process: the run can be resumed at once.
    epochs = str(Checkpoint.load(out).epoch + 1)
    done = subprocess.run(
        pyrovae("train", "--resume", str(out), "--epochs", epochs, "--no-progress", cwd=tmp_path),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr


def test_the_lock_is_exclusive_within_a_process_too(tmp_path):
    run = tmp_path / "run"
    with run_lock(run):
        assert lock_file(run).read_text().strip() == str(os.getpid())
        with pytest.raises(PyrovaeError, match=f"pid {os.getpid()}"), run_lock(run):
            pass
    with run_lock(run):  # released on leaving the block
        pass


def test_commands_that_write_into_a_run_wait_their_turn_and_others_do_not(tmp_path):
    out = tmp_path / "run"
    done = subprocess.run(
        pyrovae("train", "--out", str(out), "--epochs", "1", *SMALL, cwd=tmp_path),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    evaluate = ["evaluate", str(out), "-k", "5", "--limit", "5"]
    with run_lock(out):  # as a training of it would hold it
        for command in (evaluate, ["sample", str(out), "-n", "4"], ["report", str(out)]):
            done = subprocess.run(pyrovae(*command, cwd=tmp_path), capture_output=True, text=True)
            assert f"in use by another pyrovae process (pid {os.getpid()})" in one_line(done)
        assert not (out / "evaluation.json").exists() and not (out / "samples.png").exists()
        # Written elsewhere, nothing of the run changes: no lock needed.
        elsewhere = str(tmp_path / "e.json")
        done = subprocess.run(
            pyrovae(*evaluate, "-o", elsewhere, cwd=tmp_path), capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
    done = subprocess.run(pyrovae(*evaluate, cwd=tmp_path), capture_output=True, text=True)
    assert done.returncode == 0 and (out / "evaluation.json").is_file(), done.stderr


def test_a_training_killed_while_staging_leaves_nothing_behind_for_long(tmp_path):
    """kill -9 before the first epoch leaves a hidden staging folder (the marker and
    spec.toml, as ``stage_run`` makes it); the next training of that run, holding its lock,
    removes it, and nothing that is not a pyrovae run's."""
    out = tmp_path / "run"
    stale = stage_run(out, load_spec(None))
    set_aside = tmp_path / ".run.replaced-x1"
    (set_aside / "run").mkdir(parents=True)
    (set_aside / "run" / MARKER).write_text("a pyrovae run directory\n")
    foreign = tmp_path / ".run.partial-mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not a run")
    done = subprocess.run(
        pyrovae("train", "--out", str(out), "--epochs", "1", *SMALL, cwd=tmp_path),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert not stale.exists() and not set_aside.exists()
    assert (foreign / "notes.txt").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".run.partial-mine", "run"]
