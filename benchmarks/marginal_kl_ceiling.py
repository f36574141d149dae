"""How far the marginal KL of ``diagnose`` can be trusted: its mutual information against log N.

``diagnose`` estimates KL(q(z) ‖ p(z)) = E[KL(q(z|x) ‖ p(z))] - I(x; z) with q(z) the
aggregate of the N posteriors of the points it is given. The estimate of I(x; z) cannot
exceed log N; when every posterior is far from the others it sits at that ceiling, and the
marginal KL is then the mean KL minus log N, whatever the prior. This prints both, for each
run and each N, on the first N MNIST test images (binarized once, fixed seed).

    .venv/bin/python benchmarks/marginal_kl_ceiling.py runs/priors_guides/standard-diagonal \
        runs/priors_guides/vamp-diagonal [--sizes 200 1000 5000] [--data ../shared/data]

References:
    ELBO surgery: yet another way to carve up the variational evidence lower bound
    (Hoffman and Johnson, 2016)
"""

from __future__ import annotations

import argparse
import math
import time

from common import find_mnist

from pyrovae.inference import diagnose, load_data, load_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run directories of MNIST models")
    parser.add_argument("--sizes", type=int, nargs="+", default=[200, 1000, 5000])
    parser.add_argument("--data", help="mnist.npz or its folder (default: PYROVAE_DATA)")
    args = parser.parse_args()
    if min(args.sizes) < 2:
        parser.error("every --sizes value must be at least 2")
    path = find_mnist(args.data)
    if path is None:
        print("skipped: mnist.npz not found; pass --data DIR or set PYROVAE_DATA")
        return
    test = load_data("mnist", "dynamic", path=str(path)).test
    print("| run | N | log N | mutual information | mean KL | marginal KL | seconds |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for run_dir in args.runs:
        run = load_run(run_dir)
        for n in args.sizes:
            start = time.perf_counter()
            summary = diagnose(
                run.model, run.guide, test[:n], num_samples=0, num_latent_samples=4
            ).summary()
            print(
                f"| {run_dir} | {n} | {math.log(n):.2f} | {summary['mutual_information']:.2f} "
                f"| {summary['kl']:.2f} | {summary['marginal_kl']:.2f} "
                f"| {time.perf_counter() - start:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
