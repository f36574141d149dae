"""Why does the two-layer VAE trail the one-layer one? A controlled comparison at equal epochs.

Each arm is a shipped config with ``--set``-style overrides, trained from the same seed for
the same number of epochs, then evaluated on the same test points with the same K by
``evaluate_run``; per-site KL terms come from the final checkpoint's validation pass. The
arms isolate one change each. ``configs/mnist-burda-tanh.toml`` and
``configs/mnist-two-layer.toml`` start as Burda et al.'s code does (the ``*-burda-init`` arms);
the other arms start as PyTorch does (``TORCH_INIT``), as those configs did before.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/two_layer.py --threads 1 --epochs 10

writes ``benchmarks/results/two_layer.json`` and ``.md``; finished arms are reused.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common import ROOT, announcing, arms_parser, evaluated_arm, paired_delta, run_arms

from pyrovae.inference import load_run, train_run

ONE = "configs/mnist-burda-tanh.toml"
TWO = "configs/mnist-two-layer.toml"

BURDA_INIT = [
    'model.init="glorot"',
    'model.likelihood={kind="bernoulli", bias_from_data=true}',
]
"""Burda et al.'s start: Glorot's uniform weights, zero biases, the decoder's output bias at
the logit of the training mean."""

TORCH_INIT = ['model.init="torch"', 'model.likelihood={kind="bernoulli"}']
"""PyTorch's own start, which the two configs had before they took Burda et al.'s."""

WARMUP = ['train.kl={kind="linear", warmup_steps=2500}']
STL = ['train.objective={kind="elbo", num_particles=1, estimator="stl"}']

ARMS: dict[str, tuple[str, list[str], str]] = {
    "one": (ONE, TORCH_INIT, "one layer, PyTorch's start"),
    "two": (TWO, TORCH_INIT, "two layers, PyTorch's start"),
    "one-warmup": (
        ONE,
        TORCH_INIT + WARMUP,
        "one layer, PyTorch's start, KL warm-up over 5 epochs",
    ),
    "two-warmup": (
        TWO,
        TORCH_INIT + WARMUP,
        "two layers, PyTorch's start, KL warm-up over 5 epochs",
    ),
    "two-stl": (
        TWO,
        TORCH_INIT + STL,
        "two layers, PyTorch's start, sticking-the-landing gradient",
    ),
    "one-burda-init": (ONE, BURDA_INIT, "one layer, Burda et al.'s start (as shipped)"),
    "two-burda-init": (TWO, BURDA_INIT, "two layers, Burda et al.'s start (as shipped)"),
}
"""Arm name -> (config, overrides, what it changes)."""

BASELINES = {"one-burda-init": "one-burda-init", "two-burda-init": "one-burda-init"}
"""The arm each arm's Δ is paired with (default ``"one"``, the one-layer config as shipped)."""

RESULTS = ROOT / "benchmarks" / "results" / "two_layer"


def run_arm(name: str, args: argparse.Namespace, data: Path) -> dict:
    config, overrides, what = ARMS[name]
    out = Path(args.runs).expanduser() / f"{name}-e{args.epochs}-s{args.seed}"
    settings = [
        f"data.path={json.dumps(str(data))}",
        f"train.epochs={args.epochs}",
        f"train.seed={args.seed}",
        *overrides,
    ]
    if (out / "checkpoint.pt").is_file() and load_run(out).epoch == args.epochs:
        run = load_run(out)
    else:
        run = train_run(ROOT / config, out, overrides=settings, progress=False, force=True)
    return evaluated_arm(run, args, arm=name, what=what, config=config, overrides=overrides)


def render(rows: list[dict], protocol: str) -> str:
    lines = [
        "# Two stochastic layers against one, at equal epochs",
        "",
        protocol,
        "",
        "| arm | epochs | seed | test ELBO | log p(x) | Δ against its one-layer baseline "
        "| validation KL | active units | train s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: (r["epochs"], r["seed"])):
        same = (r["epochs"], r["seed"])
        against = BASELINES.get(r["arm"], "one")
        base = next(
            (b for b in rows if b["arm"] == against and (b["epochs"], b["seed"]) == same), None
        )
        if base is not None and r is not base:
            delta = paired_delta(r, base)
        else:
            delta = "baseline"
        lines.append(
            f"| {ARMS[r['arm']][2] if r['arm'] in ARMS else r['what']} | {r['epochs']} | {r['seed']} | {r['elbo']:.2f} | {r['log_px']:.2f} ± "
            f"{r['log_px_se']:.2f} | {delta} | {r['validation_kl']:.2f} | "
            f"{r['active_units']:.0f} | {r['train_seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = arms_parser(
        __file__, __doc__.splitlines()[0], ARMS, "~/pyrovae-runs/two_layer", RESULTS
    )
    parser.add_argument("--num-samples", type=int, default=500)
    parser.add_argument("--points", type=int, default=1000)
    args = parser.parse_args(argv)
    protocol = (
        f"Log p(x) by importance sampling with K = {args.num_samples} on the first "
        f"{args.points} test digits (binarized once); Δ is paired on the same points "
        "with the one-layer arm of the same start, epochs and seed, ± its standard "
        "error. Arms are trained and evaluated by `.venv/bin/python "
        "benchmarks/two_layer.py [ARM ...] --epochs E --seed S` (1 thread each)."
    )

    return run_arms("two_layer", args, ARMS, run_arm, announcing(render, protocol))


if __name__ == "__main__":
    sys.exit(main())
