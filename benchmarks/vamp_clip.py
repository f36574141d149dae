"""Does clipping the VampPrior's pseudo-inputs to [0, 1] change the model? A comparison at
equal epochs.

``configs/paper-vamp-1.toml`` (the VampPrior row of the reproduction table) learns its
pseudo-inputs unclipped; Tomczak and Welling's code clips them to [0, 1] before the encoder.
Both arms train that config from the same seed for the same epochs, one with
``prior.clip = true``, and are evaluated on the same test points with the same K by
``evaluate_run``; Δ is paired point by point.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/vamp_clip.py --threads 1 --epochs 100

writes ``benchmarks/results/vamp_clip.json`` and ``.md``; finished arms are reused and a
stopped one resumes from its checkpoint. A longer budget starts each arm from its longest
finished shorter run of the same seed and settings (copied, never changed), since training on
from epoch E is the same as training through it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from common import ROOT, announcing, arms_parser, evaluated_arm, paired_delta, run_arms

from pyrovae.inference import load_run, load_spec, train_run

CONFIG = "configs/paper-vamp-1.toml"

ARMS: dict[str, tuple[list[str], str]] = {
    "unclipped": (["model.prior.clip=false"], "pseudo-inputs as learned (as shipped)"),
    "clipped": (["model.prior.clip=true"], "pseudo-inputs clipped to [0, 1] (`prior.clip = true`)"),
}
"""Arm name -> (overrides of the config, what it changes)."""

BASELINE = "unclipped"

RESULTS = ROOT / "benchmarks" / "results" / "vamp_clip"


def outside_unit_interval(pseudo_inputs: torch.Tensor) -> float:
    """The share of pseudo-input entries below 0 or above 1 (those clipping holds at a bound,
    without gradient)."""
    return float(((pseudo_inputs < 0) | (pseudo_inputs > 1)).float().mean())


def shorter_run(runs: Path, name: str, seed: int, epochs: int, settings: list[str]) -> Path | None:
    """The arm's finished run of the most epochs below ``epochs``, of the same seed and, but
    for ``train.epochs``, the same spec as ``settings`` give; None where there is none."""
    found: list[tuple[int, Path]] = []
    for path in runs.glob(f"{name}-e*-s{seed}"):
        stem = path.name.removeprefix(f"{name}-e").removesuffix(f"-s{seed}")
        if stem.isdigit() and int(stem) < epochs and (path / "checkpoint.pt").is_file():
            found.append((int(stem), path))
    for shorter, path in sorted(found, reverse=True):
        run = load_run(path)
        same = load_spec(ROOT / CONFIG, [*settings, f"train.epochs={shorter}"])
        if run.epoch == shorter and run.spec.to_dict() == same.to_dict():
            return path
    return None


def run_arm(name: str, args: argparse.Namespace, data: Path) -> dict:
    overrides, what = ARMS[name]
    runs = Path(args.runs).expanduser()
    out = runs / f"{name}-e{args.epochs}-s{args.seed}"
    settings = [
        f"data.path={json.dumps(str(data))}",
        f"train.epochs={args.epochs}",
        f"train.seed={args.seed}",
        *args.set,
        *overrides,
    ]
    if not out.exists():
        start = shorter_run(runs, name, args.seed, args.epochs, settings)
        if start is not None:
            # Copied into a staging folder beside the target, named as the library stages
            # runs (so that training this path clears what a killed copy left), then renamed
            # into place: the target is either absent or a whole copy.
            staging = Path(tempfile.mkdtemp(dir=runs, prefix=f".{out.name}.partial-"))
            shutil.copytree(start, staging / out.name)
            (staging / out.name).rename(out)
            staging.rmdir()
            print(f"{name}: training on from {start.name} (a copy)", flush=True)
    if (out / "checkpoint.pt").is_file():
        run = load_run(out)
        if run.epoch < args.epochs:
            run = train_run(
                None, out, overrides=[f"train.epochs={args.epochs}"], resume=True, progress=False
            )
    else:
        run = train_run(ROOT / CONFIG, out, overrides=settings, progress=False)
    return evaluated_arm(
        run,
        args,
        arm=name,
        what=what,
        config=CONFIG,
        overrides=overrides,
        pseudo_inputs_outside=outside_unit_interval(run.model.prior.pseudo_inputs.detach()),
    )


def render(rows: list[dict], protocol: str) -> str:
    """The results page: one line per arm, epochs and seed, Δ paired with the unclipped arm of
    the same epochs and seed on the same points."""
    lines = [
        "# VampPrior pseudo-inputs clipped to [0, 1] or not, at equal epochs",
        "",
        protocol,
        "",
        "| arm | epochs | seed | test ELBO | log p(x) | Δ against unclipped (paired) "
        "| validation ELBO | pseudo-input entries outside [0, 1] | active units | train s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: (r["epochs"], r["seed"], r["arm"] != BASELINE)):
        same = (r["epochs"], r["seed"], r["points"], r["num_samples"])
        base = next(
            (
                b
                for b in rows
                if b["arm"] == BASELINE
                and (b["epochs"], b["seed"], b["points"], b["num_samples"]) == same
            ),
            None,
        )
        if r["arm"] == BASELINE:
            delta = "baseline"
        elif base is None:
            delta = "no baseline"
        else:
            delta = paired_delta(r, base)
        lines.append(
            f"| {r['what']} | {r['epochs']} | {r['seed']} | {r['elbo']:.2f} | "
            f"{r['log_px']:.2f} ± {r['log_px_se']:.2f} | {delta} | "
            f"{r['validation_elbo']:.2f} | {100 * r['pseudo_inputs_outside']:.1f}% | "
            f"{r['active_units']:.0f} | {r['train_seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = arms_parser(
        __file__, __doc__.splitlines()[0], ARMS, "~/pyrovae-runs/vamp_clip", RESULTS
    )
    parser.set_defaults(epochs=100)
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument(
        "--points", type=int, default=None, help="the first N test points (default: all)"
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="one more override"
    )
    args = parser.parse_args(argv)
    points = f"the first {args.points}" if args.points else "all"
    protocol = (
        f"`{CONFIG}` trained from the same seed for the same epochs in each arm (its KL "
        "warm-up runs over the first 100 epochs). Log p(x) by importance sampling with "
        f"K = {args.num_samples} on {points} test digits (binarized once); Δ is paired on "
        "the same points with the unclipped arm of the same epochs and seed, ± its standard "
        "error (the spread of the points, not of training seeds). Arms are trained and "
        "evaluated by `.venv/bin/python benchmarks/vamp_clip.py [ARM ...] --epochs E "
        "--seed S` (1 thread each)."
    )

    return run_arms("vamp_clip", args, ARMS, run_arm, announcing(render, protocol))


if __name__ == "__main__":
    sys.exit(main())
