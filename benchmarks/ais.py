"""Annealed importance sampling against importance sampling on a trained MNIST run, and BDMC.

On the first ``--num-points`` test images of a trained run (by default the prior x guide
grid's standard x diagonal run, ``runs/priors_guides/standard-diagonal``): importance
sampling from the guide with K = ``--num-samples``, then AIS with ``--chains`` chains for each
of ``--steps``; then BDMC on as many points simulated from the model, at the same numbers of
steps. Prints and writes (``benchmarks/results/ais.md`` and ``.json``) nats per point,
seconds and the number of model evaluations per point for each.

    PYROVAE_DATA=../shared/data .venv/bin/python benchmarks/ais.py [--run RUN]
        [--steps 100 1000] [--num-points 100]

References:
    On the Quantitative Analysis of Decoder-Based Generative Models (Wu, Burda,
    Salakhutdinov and Grosse, 2017)
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import pyro
import torch

from pyrovae.inference import (
    annealed_log_marginal_likelihood,
    bdmc,
    load_run,
    log_marginal_likelihood,
)
from pyrovae.inference.algorithms.marginal import standard_error
from pyrovae.inference.experiment.runs import load_run_data

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "ais"


def main() -> None:
    args = _parser().parse_args()
    run_dir = Path(args.run)
    if not (run_dir / "checkpoint.pt").is_file():
        print(f"skipped: no trained run at {run_dir}; train one (benchmarks/priors_guides.py)")
        return
    run = load_run(run_dir)
    x = load_run_data(run.spec).split("test")[0][: args.num_points]
    rows: list[dict[str, Any]] = []

    pyro.set_rng_seed(args.seed)
    start = time.perf_counter()
    result = log_marginal_likelihood(run.model, run.guide, x, num_samples=args.num_samples)
    rows.append(
        _row(
            f"importance sampling, K = {args.num_samples}",
            result.log_px,
            time.perf_counter() - start,
            args.num_samples,
            khat=(result.khat > 0.7).double().mean().item(),
        )
    )
    _show(rows[-1])
    for steps in args.steps:
        pyro.set_rng_seed(args.seed)
        start = time.perf_counter()
        ais = annealed_log_marginal_likelihood(
            run.model, run.guide, x, args.chains, steps, progress=True
        )
        rows.append(
            _row(
                f"AIS, {args.chains} chains x {steps} steps",
                ais.log_px,
                time.perf_counter() - start,
                args.chains * ais.evaluations,
                acceptance=ais.acceptance.mean().item(),
                paired=(ais.log_px - result.log_px),
            )
        )
        _show(rows[-1])
    sandwich = []
    for steps in args.steps:
        pyro.set_rng_seed(args.seed)
        start = time.perf_counter()
        b = bdmc(
            run.model,
            run.guide,
            args.num_points,
            example=x[:1],
            num_chains=args.bdmc_chains,
            num_steps=steps,
            progress=True,
        )
        sandwich.append(
            {
                "steps": steps,
                **b.summary(),
                "seconds": time.perf_counter() - start,
                "evaluations": 2 * args.bdmc_chains * b.forward.evaluations,
            }
        )
        print(f"   BDMC {steps} steps: {json.dumps(sandwich[-1])}", flush=True)
    meta = {
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "run": str(run_dir),
        "epoch": run.epoch,
        "num_points": len(x),
        "chains": args.chains,
        "bdmc_chains": args.bdmc_chains,
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "date": time.strftime("%Y-%m-%d"),
    }
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(
        json.dumps({"meta": meta, "rows": rows, "bdmc": sandwich}, indent=2)
    )
    out.with_suffix(".md").write_text(_markdown(meta, rows, sandwich))
    print(f"wrote {out}.md and {out}.json")


def _row(name: str, log_px: torch.Tensor, seconds: float, evaluations: int, **extra) -> dict:
    paired = extra.pop("paired", None)
    row = {
        "estimator": name,
        "log_px": log_px.mean().item(),
        "log_px_se": standard_error(log_px),
        "seconds": seconds,
        "evaluations_per_point": evaluations,
        **extra,
    }
    if paired is not None:
        row["minus_is"] = paired.mean().item()
        row["minus_is_se"] = standard_error(paired)
    return row


def _show(row: dict) -> None:
    print(f"   {json.dumps(row)}", flush=True)


def _markdown(meta: dict, rows: list[dict], sandwich: list[dict]) -> str:
    lines = [
        "# AIS against importance sampling, and BDMC",
        "",
        f"Run `{meta['run']}` (epoch {meta['epoch']}), the first {meta['num_points']} MNIST "
        "test points (binarized once, fixed seed). log p(x) is the mean over points ± its "
        'standard error over points; "AIS − IS" is the paired difference per point ± its '
        "standard error; evaluations are model-and-guide evaluations per point (AIS: chains x "
        "steps x (leapfrog steps + 2)).",
        "",
        "| estimator | log p(x) | AIS − IS | k̂ > 0.7 / acceptance | seconds | evaluations |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        diff = f"{row['minus_is']:+.3f} ± {row['minus_is_se']:.3f}" if "minus_is" in row else "—"
        extra = f"{row['khat']:.0%}" if "khat" in row else f"{row['acceptance']:.2f}"
        lines.append(
            f"| {row['estimator']} | {row['log_px']:.3f} ± {row['log_px_se']:.3f} | {diff} | "
            f"{extra} | {row['seconds']:.0f} | {row['evaluations_per_point']:,} |"
        )
    lines += [
        "",
        f"BDMC on {meta['num_points']} points simulated from the model, "
        f"{meta['bdmc_chains']} chains each way:",
        "",
        "| steps | forward AIS (lower) | reverse AIS (upper) | gap | seconds |",
        "| ---: | ---: | ---: | ---: | ---: |",
        *[
            f"| {b['steps']} | {b['lower']:.3f} | {b['upper']:.3f} | {b['gap']:.3f} | "
            f"{b['seconds']:.0f} |"
            for b in sandwich
        ],
        "",
        f"Command: `{meta['command']}` ({meta['threads']} torch threads, torch {meta['torch']}, "
        f"Pyro {meta['pyro']}, {meta['date']}).",
    ]
    return "\n".join(lines) + "\n"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=str(ROOT / "runs" / "priors_guides" / "standard-diagonal"))
    parser.add_argument("--num-points", type=int, default=100)
    parser.add_argument("--num-samples", type=int, default=5000, help="K of importance sampling")
    parser.add_argument("--steps", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--chains", type=int, default=16)
    parser.add_argument("--bdmc-chains", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=str(RESULTS))
    return parser


if __name__ == "__main__":
    main()
