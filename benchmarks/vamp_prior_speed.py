"""What the VampPrior's mixture density costs training and evaluation: pyrovae's against Pyro's.

pyrovae scores a VampPrior over a diagonal Gaussian encoder (``UniformMixture``) by one
matrix product in double precision. Two references score the same components by
broadcasting every (value, component) pair over the latent dimensions: pyrovae's own path
for other components, which the VampPrior took before (in chunks of at most
``MAX_COMPONENT_PAIRS`` pairs), and Pyro's ``MixtureSameFamily``.
Each case is a paper config trained with its own objective, KL warm-up and optimizer
(``fit``, as ``benchmarks/reproduce.py`` trains it), in three copies of the same modules that
differ only in the prior's mixture, eager and compiled (``train.compile``; the
reproduction's runs are compiled), in one process, epochs interleaved, the first epoch of
each a warm-up (and the compiled arms' trace and compile). Then each arm's modules estimate
log p(x) by importance sampling (``log_marginal_likelihood``, the final evaluation's K on a
few points), and by AIS (``annealed_log_marginal_likelihood``, HMC, eager: fewer steps
than the AIS check's 500), in turns, the first round a warm-up. The images are uniform
grey levels binarized every batch: a step's cost depends on the shapes alone.

    .venv/bin/python benchmarks/vamp_prior_speed.py [--num-points 2000] [--repeats 3]
        [--threads 1] [--compile on off] [--case vamp-1 vamp-1-iwae-k5 vamp-hvae-2]
        [--eval-points 10] [--eval-samples 5000] [--eval-repeats 2] [--ais-points 100]
        [--ais-steps 2]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import types
from collections.abc import Callable

import pyro
import pyro.distributions as dist
import torch
from common import ROOT, TakeTurns, Turns, interleaved

from pyrovae.inference import (
    annealed_log_marginal_likelihood,
    fit,
    load_spec,
    log_marginal_likelihood,
)
from pyrovae.inference.experiment.build import (
    build,
    build_objective,
    build_optimizer,
    build_schedule,
)
from pyrovae.inference.experiment.callbacks import BatchTransform
from pyrovae.model.priors import UniformMixture, VampPrior

CASES = {
    "vamp-1": ("configs/paper-vamp-1.toml", ()),
    "vamp-1-iwae-k5": (
        "configs/paper-vamp-1.toml",
        ('train.objective={ kind = "iwae", num_particles = 5, estimator = "dreg" }',),
    ),
    "vamp-hvae-2": ("configs/paper-vamp-hvae-2.toml", ()),
}
"""Case name -> (config, overrides): the reproduction rows with a VampPrior."""


def mixture_same_family(self: VampPrior) -> dist.Distribution:
    """The VampPrior as Pyro's MixtureSameFamily of the same components, equally weighted."""
    components = self.encoder(self.inputs())
    weights = torch.zeros(components.batch_shape, device=self.pseudo_inputs.device)
    return dist.MixtureSameFamily(dist.Categorical(logits=weights), components)


class BroadcastMixture(UniformMixture):
    """UniformMixture scored the way it scores components other than diagonal Gaussians."""

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        return self._broadcast_log_prob(value)


def broadcast_mixture(self: VampPrior) -> dist.Distribution:
    """The VampPrior as pyrovae scored it before the matrix product."""
    return BroadcastMixture(self.encoder(self.inputs()))


IMPLEMENTATIONS = {
    "pyrovae matrix product": None,
    "pyrovae broadcast": broadcast_mixture,
    "Pyro MixtureSameFamily": mixture_same_family,
}
"""Arm name -> the VampPrior's ``forward`` in that arm (None: as shipped)."""
SHIPPED = "pyrovae matrix product"


def arm(spec, model, guide, x, epochs: int, compile_mode: str):
    def run(turns: Turns, name: str) -> list[float]:
        params = torch.nn.ModuleList([model, guide]).parameters()
        history = fit(
            model,
            guide,
            x,
            objective=build_objective(spec),
            kl_schedule=build_schedule(spec),
            optimizer=build_optimizer(spec, params),
            epochs=epochs,
            batch_size=spec.train.batch_size,
            compile=compile_mode,
            callbacks=[TakeTurns(turns, name, epochs), BatchTransform(torch.bernoulli)],
        )
        return [row["seconds"] for row in history]

    return run


def evaluation_seconds(
    models: dict[str, tuple], estimate: Callable[..., object], repeats: int
) -> dict[str, list[float]]:
    """Seconds of ``estimate(model, guide)`` per arm, arms interleaved; the first round
    (with any trace and compile) is returned first."""
    seconds: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats + 1):
        for name, (model, guide) in models.items():
            start = time.perf_counter()
            estimate(model, guide)
            seconds[name].append(time.perf_counter() - start)
    return seconds


def report(times: dict[str, list[float]], compile_mode: str) -> None:
    """One line per arm: median (fastest-slowest; warm-up), and the shipped arm's ratio."""
    ours = statistics.median(times[SHIPPED][1:])
    for implementation, values in times.items():
        median = statistics.median(values[1:])
        print(
            f"  compile {compile_mode:<3} {implementation:<24} {median:7.2f} s "
            f"({min(values[1:]):.2f}-{max(values[1:]):.2f}; warm-up {values[0]:.2f})"
            f"   matrix product / this: {ours / median:.3f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--compile", nargs="+", choices=["on", "off"], default=["on", "off"])
    parser.add_argument("--num-points", type=int, default=2000, help="training points per epoch")
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed epochs of each arm; 0: no training"
    )
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--eval-points", type=int, default=10, help="0: no evaluation")
    parser.add_argument("--eval-samples", type=int, default=5000, help="K of the evaluation")
    parser.add_argument("--eval-repeats", type=int, default=2, help="timed evaluations of each")
    parser.add_argument("--ais-points", type=int, default=100, help="0: no AIS")
    parser.add_argument("--ais-steps", type=int, default=2, help="AIS steps per chain")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    epochs = args.repeats + 1
    print(
        f"threads {torch.get_num_threads()}, torch {torch.__version__}, pyro {pyro.__version__}; "
        "arms in turns, each timed after a warm-up: median seconds (fastest-slowest; the "
        "warm-up, with any compile), and the shipped arm's median over each arm's"
    )
    for case in args.case:
        config, overrides = CASES[case]
        spec = load_spec(ROOT / config, overrides)
        pyro.set_rng_seed(0)
        model, guide = build(spec, 784, (28, 28))
        x = torch.rand(args.num_points, 784, generator=torch.Generator().manual_seed(0))
        copies = {}
        for implementation, forward in IMPLEMENTATIONS.items():
            m, g = copy.deepcopy((model, guide))  # one copy: the encoder stays shared
            for module in m.modules():
                if forward is not None and isinstance(module, VampPrior):
                    module.forward = types.MethodType(forward, module)
            copies[implementation] = (m, g)
        print(f"\n{case} ({config}{' ' + ' '.join(overrides) if overrides else ''})")
        if args.repeats:
            arms = {
                f"{implementation}, compile {compile_mode}": arm(
                    spec, *copy.deepcopy(copies[implementation]), x, epochs, compile_mode
                )
                for compile_mode in args.compile
                for implementation in IMPLEMENTATIONS
            }
            results = interleaved(arms)
            print(f"  training: seconds per epoch of {args.num_points} points")
            for compile_mode in args.compile:
                report(
                    {i: results[f"{i}, compile {compile_mode}"] for i in IMPLEMENTATIONS},
                    compile_mode,
                )
        if args.eval_points:
            x_eval = torch.bernoulli(x[: args.eval_points])
            print(
                f"  log_marginal_likelihood: seconds for {len(x_eval)} points, "
                f"K = {args.eval_samples}"
            )
            for compile_mode in args.compile:
                seconds = evaluation_seconds(
                    copies,
                    lambda m, g, x=x_eval, c=compile_mode: log_marginal_likelihood(
                        m, g, x, args.eval_samples, compile=c
                    ),
                    args.eval_repeats,
                )
                report(seconds, compile_mode)
        if args.ais_points:
            x_ais = torch.bernoulli(x[: args.ais_points])
            print(
                f"  annealed_log_marginal_likelihood (eager): seconds for {len(x_ais)} points, "
                f"16 chains x {args.ais_steps} steps"
            )
            seconds = evaluation_seconds(
                copies,
                lambda m, g, x=x_ais: annealed_log_marginal_likelihood(m, g, x, 16, args.ais_steps),
                args.eval_repeats,
            )
            report(seconds, "off")


if __name__ == "__main__":
    main()
