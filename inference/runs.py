"""Run directories: ``spec.toml``, ``checkpoint.pt`` and ``metrics.csv``.

A checkpoint holds state dicts and plain values only (loaded with ``weights_only=True``);
the objects are rebuilt from the spec. Files are written to a temporary name and renamed,
so a run killed mid-write keeps its previous checkpoint.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from guides import AmortizedGuide
from inference.errors import PyrovaeError
from inference.spec import Spec, build, load_spec
from model import VAE

SPEC = "spec.toml"
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.csv"


@dataclass
class Run:
    """A trained run loaded from disk.

    Attributes:
        path: the run directory.
        spec: its resolved spec.
        model, guide: rebuilt from the spec with the checkpoint's parameters, in eval mode.
        checkpoint: the raw checkpoint (epoch, history, data shape, state dicts).
    """

    path: Path
    spec: Spec
    model: VAE
    guide: AmortizedGuide
    checkpoint: dict[str, Any]

    @property
    def epoch(self) -> int:
        return self.checkpoint["epoch"]

    @property
    def history(self) -> list[dict[str, float]]:
        return self.checkpoint["history"]


def create_run(path: str | Path, spec: Spec, force: bool = False) -> Path:
    """Makes a fresh run directory holding ``spec.toml``.

    Raises:
        PyrovaeError: the directory exists and ``force`` is not set.
    """
    path = Path(path)
    if path.exists():
        if not force:
            raise PyrovaeError(
                f"run directory {path} already exists; pass --force to replace it, "
                f"--resume {path} to continue it, or --out to choose another"
            )
        if not (path / SPEC).is_file() and any(path.iterdir()):
            raise PyrovaeError(
                f"{path} is not empty and holds no {SPEC}; refusing to replace a directory "
                "that is not a pyrovae run, even with --force"
            )
        shutil.rmtree(path)
    path.mkdir(parents=True)
    atomic_write(path / SPEC, spec.to_toml().encode())
    return path


def load_run(path: str | Path, map_location: str | torch.device = "cpu") -> Run:
    """Rebuilds the model and guide of a run from its spec and loads its checkpoint.

    Raises:
        PyrovaeError: the directory, spec or checkpoint is missing, or they do not match.
    """
    path = Path(path)
    if not (path / SPEC).is_file():
        raise PyrovaeError(f"{path} is not a pyrovae run: {path / SPEC} does not exist")
    spec = load_spec(path / SPEC)
    checkpoint = read_checkpoint(path, map_location)
    if checkpoint is None:
        raise PyrovaeError(f"{path} has no {CHECKPOINT} yet; train it first")
    model, guide = build(spec, checkpoint["features"], checkpoint["image_shape"])
    load_states(path, model, guide, checkpoint)
    model.eval()
    guide.eval()
    return Run(path, spec, model, guide, checkpoint)


def read_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
    """The checkpoint of run ``path``, or None when it has none."""
    file = path / CHECKPOINT
    if not file.is_file():
        return None
    try:
        return torch.load(file, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is reported the same way
        raise PyrovaeError(f"cannot read {file}: {e}") from None


def load_states(
    path: Path, model: torch.nn.Module, guide: torch.nn.Module, checkpoint: dict[str, Any]
) -> None:
    """Loads the checkpoint's model and guide states, reporting a mismatch with the spec."""
    try:
        model.load_state_dict(checkpoint["model"])
        guide.load_state_dict(checkpoint["guide"])
    except (RuntimeError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
        raise PyrovaeError(
            f"{path / CHECKPOINT} does not match {path / SPEC} ({first}); "
            "was the spec edited after training?"
        ) from None


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Writes ``checkpoint.pt`` and ``metrics.csv`` (from ``state["history"]``) atomically."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write(path / CHECKPOINT, buffer.getvalue())
    history = state["history"]
    if history:
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=list(history[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(history)
        atomic_write(path / METRICS, text.getvalue().encode())


def atomic_write(file: Path, data: bytes) -> None:
    """Writes ``data`` to a temporary file beside ``file``, then renames it over ``file``."""
    fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=f".{file.name}.")
    try:
        # mkstemp makes the file private; give it the mode a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, file)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
