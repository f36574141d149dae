"""A second, hand-written estimate of a run's test log p(x), to check the library's figure.

For a run with a diagonal-Gaussian guide, a standard-normal or VampPrior prior and Bernoulli
pixels (the reproductions' VAEs), this recomputes the importance-sampling estimate

    log p̂(x) = logmeanexp_k [log p(x|z_k) + log p(z_k) - log q(z_k|x)],   z_k ~ q(z|x),

in float64 with every density written out here: the Gaussian log densities by formula, the
VampPrior as a log-sum-exp over its pseudo-inputs' components minus log K, and the Bernoulli
log-likelihood from the decoder's logits. Only the networks are the run's (the encoder's
location and scale, the decoder's logits); no Pyro trace, site, plate or estimator of the
library is used. It prints the mean over the first test points beside the per-point figures
of an evaluation file on the same points (``pyrovae evaluate -o FILE``), and how the guide's
scales of the active units are spread (a scale floor such as a clipped log-variance would
show as a pile-up at its bound).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/independent_estimate.py RUN \\
        --evaluation RUN/evaluation-k5000.json --points 200 --threads 1
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from torch import Tensor
from torch.nn.functional import softplus

from pyrovae.inference.algorithms.marginal import standard_error
from pyrovae.inference.errors import PyrovaeError
from pyrovae.inference.experiment.runs import load_run
from pyrovae.model import Bernoulli, StandardNormal, VampPrior

LOG_2PI = math.log(2 * math.pi)


def log_normal(z: Tensor, loc: Tensor, scale: Tensor) -> Tensor:
    """log N(z; loc, diag(scale²)), summed over the last dimension."""
    return (-0.5 * ((z - loc) / scale) ** 2 - scale.log() - 0.5 * LOG_2PI).sum(-1)


def gaussian(encoder: torch.nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """The location and scale a diagonal-Gaussian encoder gives for ``x``, in float64."""
    q = encoder(x)
    base = getattr(q, "base_dist", q)
    if not isinstance(base, torch.distributions.Normal):
        raise PyrovaeError(f"the guide's encoder gives {type(base).__name__}, not a Normal")
    return base.loc.double(), base.scale.double()


def log_prior(prior: torch.nn.Module, z: Tensor) -> Tensor:
    """log p(z) for ``z`` of shape ``(..., D)``, written out."""
    if isinstance(prior, StandardNormal):
        return (-0.5 * (z.square() + LOG_2PI)).sum(-1)
    if isinstance(prior, VampPrior):
        loc, scale = gaussian(prior.encoder, prior.inputs())  # (K, D), clipped if it clips
        components = log_normal(z.unsqueeze(-2), loc, scale)  # (..., K)
        return torch.logsumexp(components, -1) - math.log(len(loc))
    raise PyrovaeError(f"no hand-written density for the prior {type(prior).__name__}")


def log_likelihood(model: torch.nn.Module, z: Tensor, x: Tensor) -> Tensor:
    """log p(x|z) of Bernoulli pixels from the decoder's logits: x·l − softplus(l)."""
    if not isinstance(model.likelihood, Bernoulli):
        raise PyrovaeError("the hand-written estimate covers Bernoulli likelihoods only")
    logits = model.decoder(z.float()).double()
    if model.likelihood.bias_from_data:
        logits = logits + model.likelihood.bias.double()
    return (x * logits - softplus(logits)).sum(-1)


@torch.no_grad()
def estimate(run, x: Tensor, num_samples: int, chunk: int, seed: int) -> Tensor:
    """Per-point log p̂(x), K = ``num_samples`` draws from the guide each."""
    if getattr(run.model, "layers", None):
        raise PyrovaeError("the hand-written estimate covers one stochastic layer only")
    generator = torch.Generator().manual_seed(seed)
    out = []
    for row in x:
        loc, scale = gaussian(run.guide.encoder, row.unsqueeze(0))
        weights = []
        for start in range(0, num_samples, chunk):
            eps = torch.randn(min(chunk, num_samples - start), loc.shape[-1], generator=generator)
            z = loc + scale * eps.double()
            log_q = log_normal(z, loc, scale)
            weights.append(
                log_likelihood(run.model, z, row.double()) + log_prior(run.model.prior, z) - log_q
            )
        out.append(torch.logsumexp(torch.cat(weights), 0) - math.log(num_samples))
    return torch.stack(out)


def scale_spread(run, x: Tensor) -> dict[str, float]:
    """How the guide's scales of the active units (variance of the mean over the points
    above 0.01) are spread over the points."""
    with torch.no_grad():
        loc, scale = gaussian(run.guide.encoder, x)
    active = loc.var(0) > 0.01
    s = scale[:, active]
    if not s.numel():
        return {"active_units": 0}
    return {
        "active_units": int(active.sum()),
        "median": s.median().item(),
        "min": s.min().item(),
        **{f"share_below_{t}": (s < t).double().mean().item() for t in (0.02, 0.05, 0.1)},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="run directory")
    parser.add_argument("--checkpoint", default="best", choices=["best", "latest"])
    parser.add_argument("--evaluation", help="an evaluation JSON of the same run to compare")
    parser.add_argument("--points", type=int, default=200, help="first test points")
    parser.add_argument("--num-samples", "-k", type=int, default=5000)
    parser.add_argument("--chunk", type=int, default=1000, help="draws per pass")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        run = load_run(args.run, checkpoint=args.checkpoint)
        x, _ = run.points("test", limit=args.points)
        ours = estimate(run, x, args.num_samples, args.chunk, args.seed)
        evaluation = None
        if args.evaluation:
            per_point = json.loads(Path(args.evaluation).read_text())["per_point"]["log_px"]
            evaluation = torch.tensor(per_point[: len(ours)], dtype=torch.float64)
    except (PyrovaeError, OSError, KeyError, json.JSONDecodeError) as e:
        print(f"independent_estimate: {e}", file=sys.stderr)
        return 2
    se = standard_error(ours)
    result = {
        "run": str(args.run),
        "checkpoint": args.checkpoint,
        "points": len(ours),
        "num_samples": args.num_samples,
        "hand_written_log_px": ours.mean().item(),
        "hand_written_log_px_se": se,
        "guide_scales": scale_spread(run, x[:2000]),
    }
    if evaluation is not None:
        diff = ours - evaluation
        result["evaluation_log_px"] = evaluation.mean().item()
        result["difference"] = diff.mean().item()
        result["difference_se"] = standard_error(diff)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
