"""What the benchmarks share: where MNIST is found, and the command line they record."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def find_mnist(data: str | None = None) -> Path | None:
    """``mnist.npz`` from ``data`` (a file or a folder), else ``$PYROVAE_DATA``, else
    ``../shared/data`` beside the checkout; None where it is not there."""
    path = Path(data or os.environ.get("PYROVAE_DATA") or ROOT.parent / "shared" / "data")
    path = path / "mnist.npz" if path.is_dir() else path
    return path.resolve() if path.is_file() else None


def command_line() -> str:
    """This process's command line as a result page records it: the interpreter relative to
    the checkout where it lies inside it, else by its name."""
    python = Path(sys.executable)
    shown = str(python.relative_to(ROOT)) if python.is_relative_to(ROOT) else python.name
    return shlex.join([shown, *sys.argv])
