"""Data-parallel training on this machine: epoch time of 2 processes (torchrun, gloo) against 1.

Trains the same spec (by default configs/mnist-standard-diagonal.toml) for ``--epochs``
epochs three ways, one after the other: one process with every core's threads, one process
with one thread, and ``--nproc`` processes of one thread each under torchrun; prints the
median epoch time of each (training only, from the runs' metrics.csv) and the ratios.

    PYROVAE_DATA=../shared/data .venv/bin/python benchmarks/ddp.py [--epochs 2]
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    args = _parser().parse_args()
    data = Path(args.data or os.environ.get("PYROVAE_DATA") or ROOT.parent / "shared" / "data")
    if not (data / "mnist.npz").is_file() and not data.is_file():
        print(f"skipped: mnist.npz not found in {data}")
        return
    overrides = [f"--set=data.path={data.resolve()}", f"--epochs={args.epochs}", "--no-progress"]
    work = Path(tempfile.mkdtemp(prefix="pyrovae-ddp-"))
    cli = [sys.executable, "-m", "pyrovae.inference.cli", "train", args.spec]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    arms = {
        f"1 process, {os.cpu_count()} threads": (cli, {}),
        "1 process, 1 thread": (cli, {"OMP_NUM_THREADS": "1"}),
        f"{args.nproc} processes (torchrun, gloo), 1 thread each": (
            [
                *torchrun,
                f"--nproc_per_node={args.nproc}",
                "-m",
                "pyrovae.inference.cli",
                "train",
                args.spec,
            ],
            {"OMP_NUM_THREADS": "1"},
        ),
    }
    seconds = {}
    try:
        for i, (name, (command, env)) in enumerate(arms.items()):
            out = work / f"run{i}"
            subprocess.run(
                [*command, "--out", str(out), *overrides],
                env={**os.environ, **env},
                check=True,
                capture_output=True,
            )
            with open(out / "metrics.csv") as f:
                seconds[name] = statistics.median(float(r["seconds"]) for r in csv.DictReader(f))
            print(f"{name:<45} {seconds[name]:7.1f} s per epoch", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    reference = next(iter(seconds.values()))
    for name, value in seconds.items():
        print(f"{name:<45} ratio {value / reference:.2f}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default=str(ROOT / "configs" / "mnist-standard-diagonal.toml"))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--data", help="a folder holding mnist.npz (default: PYROVAE_DATA)")
    return parser


if __name__ == "__main__":
    main()
