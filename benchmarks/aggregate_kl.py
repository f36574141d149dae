"""KL(q(z) ‖ p(z)) of trained MNIST models, bracketed: a critic's lower bound and the N-point
upper bound.

For each run, ``aggregate_kl`` trains a critic to tell posterior draws of the training images
from prior draws (fresh draws every epoch, stopped on the last 10,000 training images) and
evaluates the Donsker-Varadhan lower bound on the first ``--num-test`` test images and fresh
prior draws; ``diagnose`` gives the marginal KL of the same test images' N-point aggregate,
an upper bound in expectation that sits at the mean KL minus about log N. Fixed seed; the
training images are binarized once as the run's spec says.

    PYROVAE_DATA=../shared/data .venv/bin/python benchmarks/aggregate_kl.py \\
        runs/priors_guides/{standard,mixture,vamp,flow}-diagonal [--num-test 5000] \\
        [--output benchmarks/results/aggregate_kl]

References:
    ELBO surgery: yet another way to carve up the variational evidence lower bound
    (Hoffman and Johnson, 2016); Distribution matching in variational inference (Rosca,
    Lakshminarayanan and Mohamed, 2018)
"""

from __future__ import annotations

import argparse
import math
import time

from common import runs_table_args, runs_table_parser, runs_with_splits, table_meta, write_table

from pyrovae.inference import aggregate_kl


def main(argv: list[str] | None = None) -> None:
    parser = runs_table_parser(__file__, __doc__.splitlines()[0], 5000, nargs="+")
    args = runs_table_args(parser, argv)
    if args is None:
        return
    header = (
        "| run | prior | guide | mean KL | lower bound | upper bound (N-point) "
        "| I(x; z) at most | critic epochs | seconds |"
    )
    lines = [header, "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    print("\n".join(lines), flush=True)
    rows = []
    for run_dir, run, x, x_test in runs_with_splits(args.runs):
        start = time.perf_counter()
        result = aggregate_kl(run.model, run.guide, x, x_test[: args.num_test], seed=args.seed)
        seconds = time.perf_counter() - start
        row = {
            "run": run_dir,
            "prior": run.spec.model.prior["kind"],
            "guide": run.spec.guide.encoder["kind"],
            **result.summary(),
            "num_points": result.num_points,
            "validation": list(result.validation),
            "seconds": seconds,
        }
        rows.append(row)
        line = (
            f"| {run_dir} | {row['prior']} | {row['guide']} | {result.mean_kl:.2f} "
            f"| {result.lower:.2f} ± {result.lower_se:.2f} | {result.upper:.2f} "
            f"| {result.mean_kl - result.lower:.2f} | {result.epochs} | {seconds:.0f} |"
        )
        lines.append(line)
        print(line, flush=True)
    if args.output:
        write(args, rows, lines)


def write(args: argparse.Namespace, rows: list[dict], lines: list[str]) -> None:
    log_n = math.log(args.num_test)
    legend = (
        f"Lower bound: a critic's Donsker-Varadhan bound on the first {args.num_test} test "
        "images (4 posterior draws each) and 100,000 fresh prior draws, ± its standard error. "
        f"Upper bound: the marginal KL of those images' N-point aggregate (`diagnose`), "
        f"capped near the mean KL minus log N = {log_n:.2f}. "
        "'I(x; z) at most' is the mean KL minus the lower bound. Nats per point."
    )
    title = "KL(q(z) ‖ p(z)) of the aggregate posterior, bracketed"
    meta = table_meta(args, log_num_test=log_n)
    write_table(args.output, meta, rows, title, legend, lines)


if __name__ == "__main__":
    main()
