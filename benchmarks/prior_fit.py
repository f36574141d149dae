"""Richer priors fitted to a trained model's aggregate posterior: how many nats of
KL(q(z) ‖ p(z)) they close for the same q(z), and what log p(x) they give.

For each run (default: the grid's N(0, I) x diagonal runs) and each richer prior of the
shipped configs (`configs/mnist-{prior}-diagonal.toml`: a 10-component mixture, a MAF flow
prior, a 100-component VampPrior over the run's own encoder), ``fit_prior`` fits the prior to
posterior draws of the 50,000 training images (4 a point, fresh every epoch, stopped on the
last 10,000 of them) with the encoder and decoder fixed, then measures on the first
``--num-test`` test images

    gain = E_q(z)[log p'(z) - log N(z; 0, I)] = KL(q(z) ‖ N(0, I)) - KL(q(z) ‖ p'(z)),

the entropy of q cancelling, and ``evaluate_run`` estimates log p(x) with the fitted prior
in the model: K = ``--num-samples`` importance samples from the same guide on the same test
points with the same seed as the grid's evaluation, whose per-point figures
(``priors_guides_evaluation_full.json`` in the run) give the paired Δ.

    PYROVAE_DATA=../shared/data .venv/bin/python benchmarks/prior_fit.py \\
        runs/priors_guides/standard-diagonal runs/priors_guides/standard-diagonal-seed1 \\
        --output benchmarks/results/prior_fit

References:
    From Variational to Deterministic Autoencoders (Ghosh et al., 2020); ELBO surgery
    (Hoffman and Johnson, 2016)
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from pathlib import Path

import torch
from common import (
    ROOT,
    runs_table_args,
    runs_table_parser,
    runs_with_splits,
    table_meta,
    write_table,
)

from pyrovae.inference import evaluate_run, fit_prior, load_spec
from pyrovae.inference.algorithms.marginal import standard_error
from pyrovae.inference.experiment.build import component
from pyrovae.inference.experiment.runs import Run
from pyrovae.model import PRIORS

PRIOR_NAMES = ("mixture", "flow", "vamp")
EVALUATION = "priors_guides_evaluation_full.json"


def main(argv: list[str] | None = None) -> None:
    parser = runs_table_parser(
        __file__,
        __doc__.splitlines()[0],
        1000,
        nargs="*",
        default=["runs/priors_guides/standard-diagonal"],
    )
    parser.add_argument("--priors", nargs="+", choices=PRIOR_NAMES, default=list(PRIOR_NAMES))
    parser.add_argument("--num-samples", type=int, default=500, help="importance samples K")
    parser.add_argument("--epochs", type=int, default=100, help="most epochs of each fit")
    args = runs_table_args(parser, argv)
    if args is None:
        return
    header = (
        "| run | fitted prior | gain over N(0, I) | epochs | log p(x) | Δ log p(x) "
        "| fit s | eval s |"
    )
    lines = [header, "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    print("\n".join(lines), flush=True)
    rows = []
    for run_dir, run, x, x_test in runs_with_splits(args.runs):
        reference = _reference(Path(run_dir), args)
        for name in args.priors:
            prior = _prior(name, run, x[0].numel())
            start = time.perf_counter()
            fit = fit_prior(
                run.model,
                run.guide,
                prior,
                x,
                x_test[: args.num_test],
                epochs=args.epochs,
                seed=args.seed,
            )
            fit_seconds = time.perf_counter() - start
            model = copy.deepcopy(run.model)
            model.prior = fit.prior
            evaluation = evaluate_run(
                dataclasses.replace(run, model=model),
                num_samples=args.num_samples,
                limit=args.num_test,
                seed=args.seed,
                write=False,
            )
            log_px = evaluation.result.log_px.double()
            row = {
                "run": run_dir,
                "prior": name,
                "gain": fit.gain,
                "gain_se": fit.gain_se,
                "epochs": fit.epochs,
                "validation": list(fit.validation),
                "log_px": log_px.mean().item(),
                "log_px_se": standard_error(log_px),
                "fit_seconds": fit_seconds,
                "eval_seconds": evaluation.seconds,
            }
            delta = "—"
            if reference is not None:
                diff = log_px - reference
                row["delta"] = diff.mean().item()
                row["delta_se"] = standard_error(diff)
                delta = f"{row['delta']:+.2f} ± {row['delta_se']:.2f}"
            rows.append(row)
            line = (
                f"| {run_dir} | {name} | {fit.gain:.2f} ± {fit.gain_se:.2f} | {fit.epochs} "
                f"| {row['log_px']:.2f} ± {row['log_px_se']:.2f} | {delta} "
                f"| {fit_seconds:.0f} | {evaluation.seconds:.0f} |"
            )
            lines.append(line)
            print(line, flush=True)
    if args.output:
        write(args, rows, lines)


def _prior(name: str, run: Run, features: int) -> torch.nn.Module:
    """The prior of ``configs/mnist-{name}-diagonal.toml``, built for the run's latent size
    and, for the VampPrior, over the run's own encoder."""
    spec = load_spec(ROOT / "configs" / f"mnist-{name}-diagonal.toml")
    context = {
        "latent_dim": run.spec.model.latent_dim,
        "features": features,
        "in_features": features,
        "encoder": run.guide.encoder,
    }
    prior = component(PRIORS, spec.model.prior, "model.prior", context)
    return prior.to(next(run.model.parameters()).dtype)


def _reference(run_dir: Path, args: argparse.Namespace) -> torch.Tensor | None:
    """The run's own per-point log p(x) from the grid, where its settings match."""
    path = run_dir / EVALUATION
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    if (saved["num_samples"], saved["limit"], saved["seed"]) != (
        args.num_samples,
        args.num_test,
        args.seed,
    ):
        return None
    return torch.tensor(saved["per_point"]["log_px"], dtype=torch.float64)


def write(args: argparse.Namespace, rows: list[dict], lines: list[str]) -> None:
    meta = table_meta(args, num_samples=args.num_samples, threads=torch.get_num_threads())
    legend = (
        "Each richer prior of the shipped configs fitted by maximum likelihood to posterior "
        "draws of the 50,000 training images (encoder and decoder fixed). Gain: "
        "E_q(z)[log p'(z) − log N(z; 0, I)] = KL(q(z) ‖ N(0, I)) − KL(q(z) ‖ p'(z)) on the "
        f"first {args.num_test} test images (4 draws each), ± its standard error over the "
        "points: the nats of the mismatch between q(z) and N(0, I) that the fitted prior "
        "closes, and a lower bound on KL(q(z) ‖ N(0, I)). log p(x): the model with the "
        f"fitted prior, K = {args.num_samples} importance samples on the same points with the "
        "same seed as the grid's evaluation; Δ is paired with the run's own log p(x). "
        f"Fit s and eval s on {meta['threads']} CPU threads."
    )
    title = "Richer priors fitted to the aggregate posterior of trained models"
    write_table(args.output, meta, rows, title, legend, lines)


if __name__ == "__main__":
    main()
