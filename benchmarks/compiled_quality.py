"""Is the compiled training step the same model? Eager and compiled runs of one config, on the
same seeds, evaluated on the same test points.

Trains ``configs/mnist-standard-diagonal.toml`` (STL ELBO, 784-200-200-50, batch 100) for 10
epochs with ``train.compile`` off and on, for each seed, then estimates log p(x) on the first
test images with the same K and evaluation seed. The compiled step replays Pyro's random
draws, so the two arms should differ by less than the seed-to-seed spread of the eager arm.
Writes ``benchmarks/results/compiled_quality.json``.

    .venv/bin/python benchmarks/compiled_quality.py [--seeds 0 1] [--epochs 10] [--threads 1]
        [--runs ~/pyrovae-runs/compiled_quality] [--data DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from common import ROOT, command_line, find_mnist

from pyrovae.inference.algorithms.marginal import standard_error
from pyrovae.inference.experiment.evaluation import evaluate_run
from pyrovae.inference.experiment.workflow import train_run

CONFIG = ROOT / "configs" / "mnist-standard-diagonal.toml"
RESULT = ROOT / "benchmarks" / "results" / "compiled_quality.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--num-samples", type=int, default=500, help="K of the evaluation")
    parser.add_argument("--limit", type=int, default=1000, help="test images evaluated")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--runs", default=str(Path.home() / "pyrovae-runs" / "compiled_quality"))
    parser.add_argument("--data", help="mnist.npz or its folder (default: PYROVAE_DATA)")
    args = parser.parse_args()
    mnist = find_mnist(args.data)
    if mnist is None:
        sys.exit("skipped: mnist.npz not found; pass --data or set PYROVAE_DATA")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for seed in args.seeds:
        for mode in ("off", "on"):
            out = Path(args.runs) / f"seed{seed}-compile-{mode}"
            overrides = [
                f"data.path={str(mnist)!r}",
                f"train.epochs={args.epochs}",
                f"train.seed={seed}",
                f'train.compile="{mode}"',
            ]
            run = train_run(CONFIG, out, overrides=overrides, force=True, progress=False)
            seconds = sum(row["seconds"] for row in run.history)
            evaluation = evaluate_run(
                run, num_samples=args.num_samples, limit=args.limit, seed=0, write=False
            )
            log_px = evaluation.result.log_px
            row = {
                "seed": seed,
                "compile": mode,
                "test_log_px": log_px.mean().item(),
                "test_log_px_se": standard_error(log_px),
                "train_seconds": seconds,
                "final_train_elbo": run.history[-1]["train_elbo"],
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    eager = [r["test_log_px"] for r in rows if r["compile"] == "off"]
    compiled = [r["test_log_px"] for r in rows if r["compile"] == "on"]
    differences = [c - e for c, e in zip(compiled, eager, strict=True)]
    summary = {
        "command": command_line(),
        "config": str(CONFIG.relative_to(ROOT)),
        "epochs": args.epochs,
        "num_samples": args.num_samples,
        "test_points": args.limit,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "rows": rows,
        "eager_seed_spread": max(eager) - min(eager) if len(eager) > 1 else None,
        "compiled_minus_eager": differences,
        "eager_train_seconds": statistics.mean(
            r["train_seconds"] for r in rows if r["compile"] == "off"
        ),
        "compiled_train_seconds": statistics.mean(
            r["train_seconds"] for r in rows if r["compile"] == "on"
        ),
    }
    RESULT.write_text(json.dumps(summary, indent=2) + "\n")
    print(
        f"eager seed-to-seed spread {summary['eager_seed_spread']}; compiled - eager per seed "
        f"{', '.join(f'{d:+.3f}' for d in differences)} nats"
    )


if __name__ == "__main__":
    main()
