"""Objectives: the IWAE bound and the STL and DReG estimators against linear-Gaussian oracles."""

from __future__ import annotations

import copy
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from ppca import PPCAPosterior
from torch import Tensor, nn

from pyrovae.guides import AmortizedGuide, DiagonalNormal, FlowEncoder
from pyrovae.inference import PyrovaeError, Spec, load_spec
from pyrovae.inference.algorithms.objectives import OBJECTIVES, ParticleBound, elbo, iwae
from pyrovae.inference.experiment.build import build_objective
from pyrovae.model import VAE, Bernoulli, Decoder, FullRankNormal, Gaussian, StandardNormal

LATENT_DIM, FEATURES = 2, 4


def linear_gaussian(seed: int = 0) -> tuple[VAE, dist.MultivariateNormal, float]:
    """Probabilistic PCA in float64, its exact marginal p(x) and its noise scale."""
    torch.manual_seed(seed)
    decoder = nn.Linear(LATENT_DIM, FEATURES).double()
    model = VAE(StandardNormal(LATENT_DIM).double(), decoder, Gaussian(scale=0.7).double())
    # The scale the likelihood holds, in float64 (its float32 storage rounds it).
    sigma = model.likelihood(torch.zeros(FEATURES, dtype=torch.float64)).variance[0].sqrt().item()
    weight, bias = decoder.weight.detach(), decoder.bias.detach()
    covariance = weight @ weight.T + sigma**2 * torch.eye(FEATURES, dtype=torch.float64)
    return model, dist.MultivariateNormal(bias, covariance), sigma


class LocalNormal(nn.Module):
    """A diagonal Gaussian q with its own loc and scale per row of x.

    With N copies of one point, the gradients of the N rows of ``loc`` and ``log_scale`` are
    N independent draws of an estimator's gradient, all from one backward pass.
    """

    def __init__(self, loc: Tensor, scale: Tensor, num_rows: int) -> None:
        super().__init__()
        self.loc = nn.Parameter(loc.expand(num_rows, -1).clone())
        self.log_scale = nn.Parameter(scale.log().expand(num_rows, -1).clone())

    def forward(self, x: Tensor) -> dist.Distribution:
        return dist.Normal(self.loc, self.log_scale.exp()).to_event(1)


def gradient_draws(objective, num_rows: int = 20_000, seed: int = 3) -> tuple[Tensor, Tensor]:
    """Per-draw guide gradients ``(N, 2 * latent_dim)`` and the decoder weight's gradient."""
    model, _, sigma = linear_gaussian()
    x = torch.randn(1, FEATURES, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    posterior = PPCAPosterior(model.decoder, sigma)(x)
    # A guide off the posterior (which is correlated, so no diagonal guide is exact).
    loc = posterior.loc[0] + 0.3
    scale = posterior.covariance_matrix[0].diagonal().sqrt() * 1.3
    encoder = LocalNormal(loc, scale, num_rows)
    pyro.set_rng_seed(seed)
    loss = objective(model, AmortizedGuide(encoder))(x.expand(num_rows, -1))
    d_loc, d_log_scale, d_weight = torch.autograd.grad(
        loss, [encoder.loc, encoder.log_scale, model.decoder.weight]
    )
    return torch.cat([d_loc, d_log_scale], dim=-1), d_weight


def z_scores(draws: Tensor, reference: Tensor) -> Tensor:
    """Mean paired difference over its standard error, per coordinate."""
    difference = draws - reference
    return difference.mean(0) / (difference.std(0) / math.sqrt(len(difference)))


@pytest.mark.parametrize(
    "plain, low_variance, max_variance_ratio",
    [
        (elbo(1), elbo(1, "stl"), 0.5),
        (iwae(8), iwae(8, "dreg"), 0.05),
    ],
    ids=["elbo-stl", "iwae-dreg"],
)
def test_low_variance_estimators_are_unbiased_and_lower_variance(
    plain, low_variance, max_variance_ratio
):
    """Same seeds, paired: the mean guide gradients agree within 5 standard errors."""
    reference, reference_weight = gradient_draws(plain)
    draws, weight = gradient_draws(low_variance)
    assert z_scores(draws, reference).abs().max() < 5
    assert (draws.var(0) < max_variance_ratio * reference.var(0)).all()
    # Only the guide's gradient changes; the decoder's is the same sample's.
    torch.testing.assert_close(weight, reference_weight, rtol=1e-10, atol=1e-12)


def test_stl_is_biased_for_iwae():
    """The z-test above has power: STL with k = 8 misses the IWAE gradient by far."""
    reference, _ = gradient_draws(iwae(8))
    draws, _ = gradient_draws(iwae(8, "stl"))
    assert z_scores(draws, reference).abs().min() > 20


@pytest.mark.parametrize("estimator", ["reparam", "stl", "dreg"])
@pytest.mark.parametrize("num_particles", [1, 5])
def test_iwae_with_exact_posterior_equals_log_marginal(estimator, num_particles):
    model, marginal, sigma = linear_gaussian(1)
    guide = AmortizedGuide(PPCAPosterior(model.decoder, sigma))
    x = torch.randn(11, FEATURES, dtype=torch.float64) * 2
    estimate = -iwae(num_particles, estimator)(model, guide)(x)
    # Every log weight is log p(x) when q is the posterior, so log-mean-exp is too.
    torch.testing.assert_close(estimate.detach(), marginal.log_prob(x).sum(), rtol=0, atol=1e-9)


def test_iwae_tightens_with_particles_and_stays_below_log_marginal():
    model, marginal, _ = linear_gaussian()
    guide = AmortizedGuide(DiagonalNormal(FEATURES, LATENT_DIM, hidden=[3]).double())
    x = torch.randn(1000, FEATURES, dtype=torch.float64) * 2
    exact = marginal.log_prob(x)
    bounds = []
    with torch.no_grad():
        for k in [1, 5, 50]:
            scores = ParticleBound(k, importance_weighted=True).score(model, guide, x)
            bounds.append(torch.logsumexp(scores.log_weight, dim=0) - math.log(k))
    for bound in bounds:
        assert z_scores(exact[:, None], bound[:, None]) > -3  # no bound above log p(x)
    for lower, upper in zip(bounds, bounds[1:], strict=False):
        assert z_scores(upper[:, None], lower[:, None]) > 5


def test_iwae_with_one_particle_is_the_elbo_of_the_same_sample():
    model, _, _ = linear_gaussian()
    guide = AmortizedGuide(DiagonalNormal(FEATURES, LATENT_DIM, hidden=[3]).double())
    x = torch.randn(7, FEATURES, dtype=torch.float64)
    params = list(model.parameters()) + list(guide.parameters())

    def loss_and_grads(objective):
        pyro.set_rng_seed(4)
        loss = objective(model, guide)(x)
        return [loss, *torch.autograd.grad(loss, params)]

    # Pyro's Trace_ELBO draws the same z as a plate of one particle.
    for a, b in zip(loss_and_grads(elbo()), loss_and_grads(iwae(1)), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # With one particle the normalized weight is 1: DReG and STL are STL for the ELBO.
    stl = loss_and_grads(elbo(1, "stl"))
    for objective in [iwae(1, "stl"), iwae(1, "dreg")]:
        for a, b in zip(stl, loss_and_grads(objective), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("num_particles", [1, 4])
def test_stl_and_dreg_match_their_formulas_with_detached_guide_parameters(num_particles):
    """STL: the gradient of ``log p(x, z) - log q'(z)``, q' the guide with its parameters
    detached. DReG: the IWAE gradient for the model; ``sum_i w_i^2 d log w_i`` (log q' in
    log w) for the guide."""
    model, _, _ = linear_gaussian()
    guide = AmortizedGuide(DiagonalNormal(FEATURES, LATENT_DIM, hidden=[3]).double())
    x = torch.randn(5, FEATURES, dtype=torch.float64)
    model_params, guide_params = list(model.parameters()), list(guide.parameters())

    def grads(loss, params):
        gradients = torch.autograd.grad(loss, params, retain_graph=True)
        return torch.cat([g.flatten() for g in gradients])

    pyro.set_rng_seed(2)
    q = guide.encoder(x)
    z = q.rsample((num_particles,))
    detached = dist.Normal(q.base_dist.loc.detach(), q.base_dist.scale.detach()).to_event(1)
    log_w = model.decode(z).log_prob(x) + model.prior().log_prob(z) - detached.log_prob(z)
    weights = torch.softmax(log_w.detach(), dim=0)
    bound = torch.logsumexp(log_w, dim=0).sum()
    expected = {
        "stl": grads(-log_w.mean(0).sum(), model_params + guide_params),
        "dreg": torch.cat(
            [grads(-bound, model_params), grads(-(weights**2 * log_w).sum(), guide_params)]
        ),
    }
    for name, objective in [
        ("stl", elbo(num_particles, "stl")),
        ("dreg", iwae(num_particles, "dreg")),
    ]:
        pyro.set_rng_seed(2)
        loss = objective(model, guide)(x)
        torch.testing.assert_close(
            grads(loss, model_params + guide_params), expected[name], rtol=1e-10, atol=1e-12
        )


@pytest.mark.parametrize(
    "options",
    [
        {"kind": "elbo", "num_particles": 3},
        {"kind": "elbo", "num_particles": 3, "estimator": "stl"},
        {"kind": "analytic_kl", "num_particles": 3},
        {"kind": "iwae", "num_particles": 3},
        {"kind": "iwae", "num_particles": 3, "estimator": "dreg"},
        {"kind": "iwae", "num_particles": 3, "estimator": "stl"},
    ],
    ids=lambda o: "-".join(str(v) for v in o.values()),
)
def test_every_objective_gives_a_scalar_loss_and_every_gradient(options):
    assert options["kind"] in OBJECTIVES
    objective = build_objective(Spec().replace(train={"objective": options}))
    model = VAE(StandardNormal(3), Decoder(3, 6, hidden=[4]), Bernoulli())
    guide = AmortizedGuide(DiagonalNormal(6, 3, hidden=[4]))
    x = torch.bernoulli(torch.full((5, 6), 0.5))
    loss = objective(model, guide)(x)
    assert loss.shape == () and torch.isfinite(loss)
    loss.backward()
    for name, p in [*model.named_parameters(), *guide.named_parameters()]:
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_log_weights_have_a_particle_and_a_point_dimension():
    model, _, _ = linear_gaussian()
    guide = AmortizedGuide(DiagonalNormal(FEATURES, LATENT_DIM, hidden=[3]).double())
    scores = ParticleBound(6).score(model, guide, torch.zeros(4, FEATURES, dtype=torch.float64))
    assert scores.log_weight.shape == (6, 4)
    assert scores.log_likelihood.shape == scores.log_prior["z"].shape == (6, 4)
    assert scores.guide_trace.nodes["z"]["value"].shape == (6, 4, LATENT_DIM)


def test_sites_outside_the_data_plate_are_refused():
    def model(x):
        pyro.sample("w", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(0.0, 1.0), obs=x)

    def guide(x):
        pyro.sample("w", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="site 'w' is outside the data plate"):
        iwae(2)(model, guide)(torch.zeros(3))


def test_objective_options_are_checked():
    with pytest.raises(ValueError, match="unknown estimator 'bogus'; valid: reparam, stl, dreg"):
        iwae(estimator="bogus")
    with pytest.raises(ValueError, match="valid: reparam, stl$"):
        elbo(estimator="dreg")
    with pytest.raises(ValueError, match="'dreg' is for the importance-weighted bound"):
        ParticleBound(2, importance_weighted=False, estimator="dreg")
    with pytest.raises(ValueError, match="num_particles"):
        iwae(num_particles=0)
    with pytest.raises(PyrovaeError, match=r"train.objective \(kind 'iwae'\): unknown estimator"):
        build_objective(load_spec(None, ['train.objective={ kind = "iwae", estimator = "x" }']))


def test_a_full_covariance_guide_has_a_closed_form_kl_to_a_diagonal_prior():
    """analytic_kl uses it: the registered KL equals torch's MVN-to-MVN formula, and a
    Monte Carlo estimate of it within 4 standard errors; other Independent priors (a Laplace)
    stay unregistered, so TraceMeanField_ELBO falls back to Monte Carlo for them. Torch's own
    MultivariateNormal keeps torch's registry: importing pyrovae registers nothing for it."""
    from torch.distributions import kl_divergence

    torch.manual_seed(0)
    tril = torch.randn(4, 3, 3).tril()
    tril.diagonal(dim1=-2, dim2=-1).abs_().add_(0.5)
    q = FullRankNormal(torch.randn(4, 3), scale_tril=tril)
    p = dist.Normal(torch.randn(3), torch.rand(3) + 0.5).to_event(1)
    as_mvn = dist.MultivariateNormal(p.base_dist.loc, scale_tril=torch.diag(p.base_dist.scale))
    torch.testing.assert_close(kl_divergence(q, p), kl_divergence(q, as_mvn))
    z = q.sample((20_000,))
    draws = q.log_prob(z) - p.log_prob(z)
    error = draws.std(0) / math.sqrt(len(z))
    assert ((draws.mean(0) - kl_divergence(q, p)).abs() < 4 * error).all()
    with pytest.raises(NotImplementedError):
        kl_divergence(q, dist.Laplace(torch.zeros(3), 1.0).to_event(1))
    with pytest.raises(NotImplementedError):
        kl_divergence(dist.MultivariateNormal(q.loc, scale_tril=tril), p)


@pytest.mark.parametrize("passes", [2, None], ids=["coupling", "autoregressive"])
def test_stl_reaches_a_flow_guide_only_through_z(passes):
    """A flow guide caches its sample's log density (ZukoToPyro); STL scores the sample a
    second time, at ``z.detach()``, so its gradient is that of ``log p(x, z) - log q'(z)``
    with q' the flow with its parameters detached, as for a Gaussian guide."""
    model, _, _ = linear_gaussian()
    encoder = FlowEncoder(
        FEATURES, LATENT_DIM, transforms=2, flow_hidden=[8], context_features=3, hidden=[5],
        passes=passes,
    ).double()  # fmt: skip
    with torch.no_grad():  # away from the identity, so that the flow's gradient matters
        for p in encoder.parameters():
            p.add_(0.3 * torch.randn_like(p))
    guide = AmortizedGuide(encoder)
    x = torch.randn(5, FEATURES, dtype=torch.float64)
    params = list(model.parameters()) + list(encoder.parameters())

    def grads(loss):
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])

    pyro.set_rng_seed(2)
    z = encoder(x)((1,))  # as the guide draws it: one particle
    frozen = copy.deepcopy(encoder).requires_grad_(False)  # q', a frozen copy of the guide
    log_q = frozen(x).log_prob(z)
    log_w = model.decode(z).log_prob(x) + model.prior().log_prob(z) - log_q
    expected = grads(-log_w.sum())
    pyro.set_rng_seed(2)
    stl = grads(elbo(1, "stl")(model, guide)(x))
    torch.testing.assert_close(stl, expected, rtol=1e-8, atol=1e-10)
    pyro.set_rng_seed(2)
    plain = grads(elbo(1)(model, guide)(x))
    assert (plain - expected).abs().max() > 1e-3  # the score term STL drops is not zero
