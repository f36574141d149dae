"""The model and guide programs, and the exact ELBO of a linear-Gaussian VAE."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from ppca import PPCAPosterior
from pyro import poutine
from torch import nn

from pyrovae.guides import AmortizedGuide, DiagonalNormal
from pyrovae.inference import analytic_kl, elbo
from pyrovae.model import (
    DATA_PLATE,
    LATENT,
    OBSERVED,
    VAE,
    Bernoulli,
    Decoder,
    Gaussian,
    StandardNormal,
)


def test_any_module_that_fits_plugs_in():
    vae = VAE(StandardNormal(2), nn.Linear(2, 5), Gaussian(scale=0.5))
    guide = AmortizedGuide(DiagonalNormal(in_features=5, latent_dim=2, hidden=[8]))
    x = torch.randn(7, 5)
    guide_trace = poutine.trace(guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(vae, trace=guide_trace)).get_trace(x)
    assert set(guide_trace.stochastic_nodes) - {DATA_PLATE} == {LATENT}
    assert model_trace.nodes[OBSERVED]["is_observed"]
    assert model_trace.nodes[LATENT]["value"] is guide_trace.nodes[LATENT]["value"]
    frames = {f.name for f in model_trace.nodes[OBSERVED]["cond_indep_stack"]}
    assert frames == {DATA_PLATE}
    assert vae.sample(3).shape == (3, 5)
    assert vae.sample(3, mean=False).shape == (3, 5)


def test_vectorized_particles_shapes():
    vae = VAE(StandardNormal(3), Decoder(3, 6, hidden=[4]), Bernoulli())
    guide = AmortizedGuide(DiagonalNormal(6, 3, hidden=[4]))
    x = torch.bernoulli(torch.full((5, 6), 0.5))
    loss = elbo(num_particles=7)(vae, guide)(x)
    assert loss.shape == () and torch.isfinite(loss)
    loss.backward()


def test_bernoulli_is_binary_cross_entropy():
    logits, x = torch.randn(4, 6), torch.rand(4, 6)
    log_p = Bernoulli()(logits).log_prob(x)
    bce = nn.functional.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1)
    torch.testing.assert_close(log_p, -bce)


@pytest.mark.parametrize("scale", [0.1, 1.0, 3.0])
def test_gaussian_fixed_scale_is_mse_plus_constant(scale):
    loc, x = torch.randn(4, 6), torch.randn(4, 6)
    log_p = Gaussian(scale=scale)(loc).log_prob(x)
    mse = ((x - loc) ** 2).sum(-1)
    constant = 6 * math.log(scale * math.sqrt(2 * math.pi))
    torch.testing.assert_close(log_p, -mse / (2 * scale**2) - constant)


def test_gaussian_learned_scale_is_a_parameter():
    likelihood = Gaussian(scale=0.5, learn_scale=True)
    assert [name for name, _ in likelihood.named_parameters()] == ["log_scale"]
    assert not list(Gaussian(scale=0.5).parameters())
    with pytest.raises(ValueError, match="scale must be positive"):
        Gaussian(scale=0.0)


@pytest.mark.parametrize("objective", [elbo, analytic_kl])
def test_elbo_with_exact_posterior_equals_log_marginal(objective):
    """Probabilistic PCA: log p(x) = log N(x; b, W W^T + sigma^2 I), and the ELBO is tight."""
    torch.manual_seed(1)
    latent_dim, features, sigma = 2, 5, 0.7
    decoder = nn.Linear(latent_dim, features).double()
    model = VAE(StandardNormal(latent_dim).double(), decoder, Gaussian(scale=sigma).double())
    # The scale the likelihood holds, in float64 (its float32 storage rounds it).
    sigma = model.likelihood(torch.zeros(features, dtype=torch.float64)).variance[0].sqrt().item()
    guide = AmortizedGuide(PPCAPosterior(decoder, sigma))
    x = torch.randn(11, features, dtype=torch.float64) * 2
    weight, bias = decoder.weight.detach(), decoder.bias.detach()
    marginal = dist.MultivariateNormal(
        bias,
        covariance_matrix=weight @ weight.T + sigma**2 * torch.eye(features, dtype=torch.float64),
    )
    exact = marginal.log_prob(x).sum()
    if objective is elbo:
        with torch.no_grad():
            estimate = -objective(num_particles=3)(model, guide)(x)
        # Every Monte Carlo sample of log p(x, z) - log q(z|x) equals log p(x) when q is exact.
        torch.testing.assert_close(estimate, exact, rtol=0, atol=1e-9)
        return
    # With the KL in closed form only E_q[log p(x|z)] is sampled: the estimate is unbiased but
    # not exact. One particle's standard deviation here is 3.3 nats, so 10,000 particles give
    # 0.033; the tolerance is 4.5 of those.
    torch.manual_seed(0)
    with torch.no_grad():
        estimate = -objective(num_particles=10_000)(model, guide)(x)
    torch.testing.assert_close(estimate, exact, rtol=0, atol=0.15)


def test_elbo_below_log_marginal_with_wrong_guide():
    torch.manual_seed(2)
    decoder = nn.Linear(2, 4).double()
    model = VAE(StandardNormal(2).double(), decoder, Gaussian(scale=0.5).double())
    guide = AmortizedGuide(DiagonalNormal(4, 2, hidden=[3]).double())
    x = torch.randn(50, 4, dtype=torch.float64)
    weight, bias = decoder.weight.detach(), decoder.bias.detach()
    exact = dist.MultivariateNormal(
        bias, weight @ weight.T + 0.25 * torch.eye(4, dtype=torch.float64)
    )
    with torch.no_grad():
        estimate = -elbo(num_particles=200)(model, guide)(x)
    assert estimate < exact.log_prob(x).sum() - 1.0


def test_objective_options_are_checked():
    with pytest.raises(ValueError, match="num_particles"):
        elbo(num_particles=0)
    pyro.clear_param_store()  # nothing should have been put there
    assert not pyro.get_param_store().keys()
