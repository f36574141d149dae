"""The README's tour runs as written, top to bottom, on a fresh checkout.

The command-line block of "The command line" and the Python blocks of "Python API" are
extracted from README.md and run in order in an empty directory laid out like a clone
(``configs/`` beside the runs), with a home folder whose ``~/data`` holds MNIST, as the README
tells a user to set it up, and without ``PYROVAE_DATA``.
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


def blocks(section: str, language: str) -> list[str]:
    """The fenced ``language`` blocks of the README section titled ``section``."""
    text = (ROOT / "README.md").read_text()
    start = text.index(f"\n## {section}\n")
    end = text.find("\n## ", start + 1)
    body = text[start : end if end != -1 else None]
    return re.findall(rf"```{language}\n(.*?)```", body, flags=re.S)


def test_the_readme_has_the_blocks_this_test_runs():
    assert len(blocks("The command line", "bash")) == 1
    assert len(blocks("Python API", "python")) == 2


@pytest.mark.skipif(not (DATA / "mnist.npz").is_file(), reason="../shared/data/mnist.npz absent")
def test_the_readme_tour_runs_as_written(tmp_path):
    clone = tmp_path / "clone"
    clone.mkdir()
    (clone / "configs").symlink_to(ROOT / "configs")
    home = tmp_path / "home"
    home.mkdir()
    (home / "data").symlink_to(DATA)
    env = {k: v for k, v in os.environ.items() if k != "PYROVAE_DATA"}
    env["HOME"] = str(home)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["MPLBACKEND"] = "Agg"

    def run(argv: list[str], what: str) -> None:
        done = subprocess.run(argv, cwd=clone, env=env, capture_output=True, text=True)
        assert done.returncode == 0, f"{what} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        assert "Traceback" not in done.stderr, done.stderr[-2000:]
        # No library's multi-line warnings (ArviZ's FutureWarning, matplotlib's) reach a user.
        assert "FutureWarning" not in done.stderr and "UserWarning" not in done.stderr, done.stderr

    (tour,) = blocks("The command line", "bash")
    assert shutil.which("pyrovae", path=env["PATH"]), "the pyrovae command is not installed"
    run(["bash", "-e", "-o", "pipefail", "-c", tour], "the command-line tour")
    for path in (
        "runs/default",
        "runs/z2",
        "runs/m/samples.png",
        "runs/m/evaluation.json",
        "runs/m/report.html",
        "runs/m/ais.json",
    ):
        assert (clone / path).exists(), path
    for i, block in enumerate(blocks("Python API", "python")):
        run([sys.executable, "-c", block], f"Python block {i + 1}")
    assert (clone / "runs/api/evaluation.json").is_file()
