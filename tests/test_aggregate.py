"""The aggregate posterior's KL against closed forms: probabilistic PCA's exact posterior,
whose aggregate is the prior, and the same posterior shifted, whose aggregate is a shifted
prior. The models' posteriors are narrow, so the N-point marginal KL of ``diagnose`` sits
at its ceiling while the critic's bound does not."""

from __future__ import annotations

import math

import pytest
import torch
from ppca import PPCAPosterior
from torch import nn

from pyrovae.guides import AmortizedGuide
from pyrovae.inference import aggregate_kl
from pyrovae.model import VAE, Gaussian, StandardNormal

# Two informative units out of three: I(x; z) = 0.5 * (log(1 + 400/0.0025) + log(1 + 100/0.0025))
# = 11.3 nats, far above log 500 = 6.2 for 500 held-out points.
COLUMN_NORMS, NOISE = (20.0, 10.0, 0.0), 0.05
SMALL = {"hidden": 64, "num_prior_draws": 50_000}


def ppca(shift: float = 0.0) -> tuple[VAE, AmortizedGuide]:
    decoder = nn.Linear(3, 6).double()
    with torch.no_grad():
        decoder.weight.zero_()
        for unit, norm in enumerate(COLUMN_NORMS):
            decoder.weight[unit, unit] = norm
        decoder.bias.copy_(torch.linspace(-1, 1, 6))
    model = VAE(StandardNormal(3).double(), decoder, Gaussian(scale=NOISE).double())
    return model, AmortizedGuide(PPCAPosterior(decoder, NOISE, shift=shift))


def mutual_information() -> float:
    return sum(0.5 * math.log1p(norm**2 / NOISE**2) for norm in COLUMN_NORMS)


def test_exact_posterior_has_no_aggregate_kl_where_the_n_point_bound_is_capped():
    """Exact posteriors of data drawn from the model: q(z) = p(z), KL 0. The N-point figure
    is the mean KL (11.3) minus at most log 500, about 5; the critic's bound is 0 within
    0.02 nats (measured -0.003 +- 0.001 at this seed)."""
    model, guide = ppca()
    torch.manual_seed(0)
    x, x_test = model.sample(4000, mean=False), model.sample(500, mean=False)
    state = torch.get_rng_state()
    result = aggregate_kl(model, guide, x, x_test, **SMALL)
    assert torch.equal(torch.get_rng_state(), state)
    assert result.site == "z" and result.num_points == 500
    assert abs(result.lower) < 0.02
    assert result.upper > mutual_information() - math.log(500) - 0.2
    assert result.upper > 4.0
    # mean KL = I(x; z) + KL(q(z) || p(z)) with the last 0: the bound pins the information.
    assert result.mean_kl - result.lower == pytest.approx(mutual_information(), abs=0.15)
    again = aggregate_kl(model, guide, x, x_test, **SMALL)
    assert again.lower == result.lower and again.validation == result.validation


def test_shifted_posterior_aggregate_kl_is_bounded_below_tightly():
    """Every posterior moved by 0.5 in each of 3 units: q(z) = N(0.5, I), KL = 3 * 0.5^2 / 2
    = 0.375. The bound stays below it (up to 3 standard errors) and within 0.1 of it
    (measured 0.348 +- 0.020 at this seed)."""
    model, guide = ppca(shift=0.5)
    torch.manual_seed(1)
    x, x_test = model.sample(4000, mean=False), model.sample(500, mean=False)
    result = aggregate_kl(model, guide, x, x_test, upper=False, **SMALL)
    truth = 3 * 0.5**2 / 2
    assert result.lower <= truth + 3 * result.lower_se
    assert result.lower > truth - 0.1
    assert math.isnan(result.upper) and math.isnan(result.mean_kl)
    assert result.epochs == len(result.validation) >= 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"site": "w"}, "not a latent site"),
        ({"validation": 1.5}, "validation must be a share"),
        ({"num_draws": 0}, "num_draws must be an integer >= 1"),
    ],
)
def test_rejects_bad_arguments(kwargs, message):
    model, guide = ppca()
    x = model.sample(40, mean=False)
    with pytest.raises(ValueError, match=message):
        aggregate_kl(model, guide, x, x, **kwargs)


def test_rejects_a_pool_too_small_to_validate_and_a_single_unbatched_point():
    model, guide = ppca()
    x = model.sample(10, mean=False)
    with pytest.raises(ValueError, match="at least 2 training, 2 validation"):
        aggregate_kl(model, guide, x, x, validation=0.05)
    with pytest.raises(ValueError, match=r"x_test must be \(N, \*features\)"):
        aggregate_kl(model, guide, x, x[0])


def test_both_sites_of_a_stack_with_the_exact_guide():
    """A two-layer linear-Gaussian stack with its exact posterior: each site's aggregate is
    its prior marginal, so both KLs are 0; with the encoder's mean moved by 1, q(z1) is
    p(z1) = N(0.3, 2.74) moved by 1, KL = 1 / (2 * 2.74) = 0.18. Neither site has the
    closed-form aggregate of the N-point bound (z1's prior and z2's guide depend on the
    other latent), so only the critic's bound is there. Measured at this seed: -0.001 and
    -0.003 (tolerance 0.02), and 0.199 +- 0.014 for the moved encoder (a Monte Carlo
    estimate of a bound: it may exceed the truth by its noise, allowed 3 standard errors)."""
    from test_layers import _two_layer_gaussian

    model, guide, marginal = _two_layer_gaussian()
    torch.manual_seed(0)
    x, x_test = marginal.sample((4000,)), marginal.sample((500,))
    for site in ("z1", "z2"):
        result = aggregate_kl(model, guide, x, x_test, site=site, **SMALL)
        assert result.site == site
        assert abs(result.lower) < 0.02, site
        assert math.isnan(result.upper)
    with torch.no_grad():
        guide.encoder.net[0].bias[0] += 1.0
    shifted = aggregate_kl(model, guide, x, x_test, site="z1", upper=False, **SMALL)
    truth = 1 / (2 * (1.5**2 + 0.7**2))
    assert truth - 0.05 < shifted.lower <= truth + 3 * shifted.lower_se


def test_the_critic_and_maximum_likelihood_fit_recover_two_gaussians():
    """On draws alone: the critic's Donsker-Varadhan bound reaches KL(N(1, 1) || N(0, 1)) =
    0.5 nats (its quadratic features make the optimum linear), and a Gaussian fitted by
    maximum likelihood finds loc 1 and scale 2; tolerances are several standard errors."""
    from pyrovae.inference.algorithms.density import donsker_varadhan, fit_critic, fit_density

    torch.manual_seed(0)

    def pair(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(n, 1) + 1, torch.randn(n, 1)

    critic, history = fit_critic(
        lambda: pair(20_000), pair(5_000), hidden=16, epochs=30, patience=3,
        batch_size=500, lr=1e-2,
    )  # fmt: skip
    with torch.no_grad():
        bound, se = donsker_varadhan(*(critic(z) for z in pair(20_000)))
    assert abs(bound - 0.5) < 0.05 and se < 0.02 and len(history) >= 2

    class Gaussian1d(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.loc = torch.nn.Parameter(torch.zeros(1))
            self.log_scale = torch.nn.Parameter(torch.zeros(1))

        def forward(self):
            return torch.distributions.Independent(
                torch.distributions.Normal(self.loc, self.log_scale.exp()), 1
            )

    torch.manual_seed(1)
    density = Gaussian1d()
    valid = 2 * torch.randn(5_000, 1) + 1
    fit_density(
        density, list(density.parameters()), lambda: 2 * torch.randn(20_000, 1) + 1,
        lambda: density().log_prob(valid).mean().item(), epochs=100, patience=10,
        batch_size=500, lr=2e-2,
    )  # fmt: skip
    assert density.loc.item() == pytest.approx(1.0, abs=0.05)
    assert density.log_scale.exp().item() == pytest.approx(2.0, abs=0.05)
