"""The README's examples and the documented command-line tour run as written.

The Python block of the README's "In Python" and the command-line block of "On the command
line" run on the bundled digits. The tour of ``docs/guide/cli.md`` ("A tour") and the Python
blocks of ``docs/guide/python.md`` then run in order, as a user following the guide would, on
MNIST: in an empty directory laid out like a clone (``configs/`` beside the runs), with a
home folder whose ``~/data`` holds MNIST, as the guide tells a user to set it up, and without
``PYROVAE_DATA``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
README = ROOT / "README.md"
CLI_GUIDE = ROOT / "docs" / "guide" / "cli.md"
PYTHON_GUIDE = ROOT / "docs" / "guide" / "python.md"


def blocks(page: Path, language: str, section: str | None = None) -> list[str]:
    """The fenced ``language`` blocks of ``page``, or of its ``## section`` only."""
    text = page.read_text()
    if section is not None:
        start = text.index(f"\n## {section}\n")
        end = text.find("\n## ", start + 1)
        text = text[start : end if end != -1 else None]
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)


def test_the_readme_and_guide_have_the_blocks_this_test_runs():
    assert len(blocks(README, "python", "In Python")) == 1
    assert len(blocks(README, "bash", "On the command line")) == 1
    assert len(blocks(CLI_GUIDE, "bash", "A tour")) == 1
    assert len(blocks(PYTHON_GUIDE, "python")) == 2


def test_the_readme_points_nowhere_outside_the_repository():
    text = README.read_text()
    assert "../" not in text
    for target in re.findall(r"\]\(([^)]+)\)", text):
        if not target.startswith(("http://", "https://")):
            assert (ROOT / target).exists(), target


@pytest.fixture
def clone(tmp_path):
    """An empty directory laid out like a clone, and a runner of commands in it."""
    directory = tmp_path / "clone"
    directory.mkdir()
    (directory / "configs").symlink_to(ROOT / "configs")
    home = tmp_path / "home"
    home.mkdir()
    (home / "data").symlink_to(DATA)
    env = {k: v for k, v in os.environ.items() if k != "PYROVAE_DATA"}
    env["HOME"] = str(home)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["MPLBACKEND"] = "Agg"
    assert shutil.which("pyrovae", path=env["PATH"]), "the pyrovae command is not installed"

    def run(argv: list[str], what: str) -> str:
        done = subprocess.run(argv, cwd=directory, env=env, capture_output=True, text=True)
        assert done.returncode == 0, f"{what} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        assert "Traceback" not in done.stderr, done.stderr[-2000:]
        # No library's multi-line warnings (ArviZ's FutureWarning, matplotlib's) reach a user.
        assert "FutureWarning" not in done.stderr and "UserWarning" not in done.stderr, done.stderr
        return done.stdout

    run.directory = directory  # type: ignore[attr-defined]
    return run


def test_the_readme_examples_run_as_written(clone):
    (python,) = blocks(README, "python", "In Python")
    out = clone([sys.executable, "-c", python], "the README's Python example")
    assert "test log p(x) = " in out
    (commands,) = blocks(README, "bash", "On the command line")
    clone(["bash", "-e", "-o", "pipefail", "-c", commands], "the README's command-line example")
    for path in ("samples.png", "evaluation.json", "report.html", "checkpoint.pt"):
        assert (clone.directory / "runs/digits" / path).is_file(), path


@pytest.mark.skipif(not (DATA / "mnist.npz").is_file(), reason="../shared/data/mnist.npz absent")
def test_the_documented_tour_runs_as_written(clone):
    (tour,) = blocks(CLI_GUIDE, "bash", "A tour")
    clone(["bash", "-e", "-o", "pipefail", "-c", tour], "the command-line tour")
    for path in (
        "runs/default",
        "runs/z2",
        "runs/m/samples.png",
        "runs/m/evaluation.json",
        "runs/m/report.html",
        "runs/m/ais.json",
    ):
        assert (clone.directory / path).exists(), path
    for i, block in enumerate(blocks(PYTHON_GUIDE, "python")):
        clone([sys.executable, "-c", block], f"Python block {i + 1} of the Python guide")
    assert (clone.directory / "runs/api/evaluation.json").is_file()
