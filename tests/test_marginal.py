"""The importance-sampling estimator of log p(x) against linear-Gaussian closed forms.

Probabilistic PCA, z ~ N(0, I), x|z ~ N(Wz + b, s² I), has log p(x) = log N(x; b, W Wᵀ + s² I)
and a Gaussian posterior, so an exact guide makes every log weight equal log p(x), and a
wrong one must converge to it as K grows. All oracles run in float64 with fixed seeds.
"""

from __future__ import annotations

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from ppca import PPCAPosterior, gaussian_posterior, ppca_log_px
from torch import Tensor, nn

from pyrovae.guides import AmortizedGuide, DiagonalNormal
from pyrovae.inference.algorithms.marginal import log_marginal_likelihood, standard_error
from pyrovae.inference.algorithms.psis import _khat_arviz, _khat_arviz_stats, pareto_khat
from pyrovae.model import VAE, Bernoulli, Decoder, Gaussian, StandardNormal
from pyrovae.model.sites import DATA_PLATE, LATENT, OBSERVED

LATENT_DIM, FEATURES, NOISE = 2, 5, 0.5


def _ppca(seed: int = 0) -> tuple[VAE, nn.Linear]:
    torch.manual_seed(seed)
    decoder = nn.Linear(LATENT_DIM, FEATURES).double()
    return VAE(StandardNormal(LATENT_DIM), decoder, Gaussian(scale=NOISE)).double(), decoder


@pytest.fixture
def ppca() -> tuple[VAE, nn.Linear, Tensor, Tensor]:
    vae, decoder = _ppca()
    x = vae.sample(12, mean=False)
    return vae, decoder, x, ppca_log_px(decoder, NOISE, x)


def test_exact_posterior_gives_every_weight_log_px(ppca):
    vae, decoder, x, log_px = ppca
    guide = AmortizedGuide(PPCAPosterior(decoder, NOISE))
    result = log_marginal_likelihood(vae, guide, x, 200, return_log_weights=True)
    assert result.log_weights.shape == (len(x), 200)
    torch.testing.assert_close(
        result.log_weights, log_px[:, None].expand(-1, 200), atol=1e-6, rtol=0
    )
    torch.testing.assert_close(result.log_px, log_px, atol=1e-6, rtol=0)
    torch.testing.assert_close(result.elbo, log_px, atol=1e-6, rtol=0)
    assert (result.stderr < 1e-6).all()
    torch.testing.assert_close(result.ess, torch.full_like(log_px, 200.0))
    assert torch.isfinite(result.khat).all() and (result.khat <= 0.5).all()


def test_wrong_guide_converges_to_closed_form(ppca):
    vae, decoder, x, log_px = ppca
    guide = AmortizedGuide(PPCAPosterior(decoder, NOISE, shift=0.3, widen=1.5))
    coarse = log_marginal_likelihood(vae, guide, x, 10)
    fine = log_marginal_likelihood(vae, guide, x, 5000)
    error = (fine.log_px - log_px).abs()
    # Tolerance: 5 Monte Carlo standard errors (each about 0.01 here) plus 0.01.
    assert (error <= 5 * fine.stderr + 0.01).all(), error
    assert error.mean() < 0.05 < (coarse.log_px - log_px).abs().mean()
    assert (fine.elbo < log_px - 0.1).all()
    assert (fine.khat < 0.5).all()
    assert (fine.ess > 1000).all()


def test_too_narrow_guide_has_high_khat(ppca):
    vae, decoder, x, log_px = ppca
    guide = AmortizedGuide(PPCAPosterior(decoder, NOISE, widen=0.3))
    result = log_marginal_likelihood(vae, guide, x, 2000)
    # Normal target, proposal 0.3 times as wide: the weights' tail index is 1 - 0.3² = 0.91.
    assert result.khat.median() > 0.7
    assert result.summary()["khat_bad_fraction"] > 0.5


def test_iwae_bounds_tighten_and_match_the_estimate(ppca):
    vae, decoder, x, log_px = ppca
    guide = AmortizedGuide(PPCAPosterior(decoder, NOISE, shift=0.5, widen=0.8))
    result = log_marginal_likelihood(vae, guide, x, 1000)
    assert list(result.iwae) == [1, 10, 100, 1000]
    means = [result.iwae[k].mean().item() for k in result.iwae]
    assert means == sorted(means), means
    summary = result.summary()
    assert means[-1] <= log_px.mean().item() + 3 * summary["log_px_mc_error"]
    # The error of the mean combines the points' errors; their average is not reported.
    n = len(result.log_px)
    assert summary["log_px_mc_error"] == pytest.approx(result.stderr.square().sum().sqrt() / n)
    assert "stderr" not in summary
    torch.testing.assert_close(result.iwae[1], result.elbo)
    torch.testing.assert_close(result.iwae[1000], result.log_px)
    torch.testing.assert_close(result.elbo, result.reconstruction - result.kl)
    prior = dist.MultivariateNormal(
        torch.zeros(LATENT_DIM, dtype=x.dtype), torch.eye(LATENT_DIM, dtype=x.dtype)
    )
    analytic_kl = torch.distributions.kl_divergence(guide.encoder(x), prior)
    # Monte Carlo KL over 1000 draws: standard error about 0.03 here.
    torch.testing.assert_close(result.kl, analytic_kl, atol=0.15, rtol=0)


class HierarchicalModel(nn.Module):
    """z1 ~ N(0, I), z2|z1 ~ N(a z1, s² I), x|z2 ~ N(W z2 + b, σ² I), written by hand."""

    def __init__(self, a: float = 0.8, s: float = 0.6) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.a, self.s = a, s
        self.decoder = nn.Linear(LATENT_DIM, FEATURES).double()

    @property
    def prior_var(self) -> float:
        return self.a**2 + self.s**2

    def forward(self, x: Tensor) -> None:
        zeros = torch.zeros(LATENT_DIM, dtype=x.dtype)
        with pyro.plate(DATA_PLATE, len(x)):
            z1 = pyro.sample("z1", dist.Normal(zeros, 1.0).to_event(1))
            z2 = pyro.sample("z2", dist.Normal(self.a * z1, self.s).to_event(1))
            pyro.sample(OBSERVED, dist.Normal(self.decoder(z2), NOISE).to_event(1), obs=x)


class HierarchicalGuide(nn.Module):
    """q(z2|x) q(z1|z2): the exact posterior in reverse order, optionally shifted, widened."""

    def __init__(self, model: HierarchicalModel, shift: float = 0.0, widen: float = 1.0):
        super().__init__()
        self.model, self.shift, self.widen = model, shift, widen

    def forward(self, x: Tensor) -> None:
        m = self.model
        loc, scale_tril = gaussian_posterior(m.decoder, NOISE, m.prior_var, x)
        with pyro.plate(DATA_PLATE, len(x)):
            q2 = dist.MultivariateNormal(loc + self.shift, scale_tril=self.widen * scale_tril)
            z2 = pyro.sample("z2", q2)
            scale = self.widen * m.s / math.sqrt(m.prior_var)
            pyro.sample("z1", dist.Normal(m.a * z2 / m.prior_var, scale).to_event(1))


@pytest.fixture
def hierarchical() -> tuple[HierarchicalModel, Tensor, Tensor]:
    model = HierarchicalModel()
    torch.manual_seed(2)
    z2 = model.prior_var**0.5 * torch.randn(10, LATENT_DIM, dtype=torch.float64)
    with torch.no_grad():
        x = model.decoder(z2) + NOISE * torch.randn(10, FEATURES, dtype=torch.float64)
        return model, x, ppca_log_px(model.decoder, NOISE, x, model.prior_var)


def test_hierarchical_model_with_exact_guide_is_exact(hierarchical):
    model, x, log_px = hierarchical
    result = log_marginal_likelihood(model, HierarchicalGuide(model), x, 100)
    torch.testing.assert_close(result.log_px, log_px, atol=1e-6, rtol=0)
    assert (result.khat <= 0.5).all()


def test_hierarchical_model_with_wrong_guide_converges(hierarchical):
    model, x, log_px = hierarchical
    guide = HierarchicalGuide(model, shift=0.2, widen=1.3)
    result = log_marginal_likelihood(model, guide, x, 4000)
    error = (result.log_px - log_px).abs()
    assert (error <= 5 * result.stderr + 0.01).all(), error
    assert (result.elbo < log_px).all()
    torch.testing.assert_close(result.elbo, result.reconstruction - result.kl)


def test_chunking_does_not_change_the_estimate(ppca):
    vae, decoder, x, log_px = ppca
    exact = AmortizedGuide(PPCAPosterior(decoder, NOISE))
    whole = log_marginal_likelihood(vae, exact, x, 300)
    chunked = log_marginal_likelihood(vae, exact, x, 300, chunk_size=60, batch_size=5)
    # Different draws, same weight up to the rounding of the posterior's covariance.
    torch.testing.assert_close(chunked.log_px, whole.log_px, atol=1e-8, rtol=0)

    wrong = AmortizedGuide(PPCAPosterior(decoder, NOISE, shift=0.3, widen=1.5))
    pyro.set_rng_seed(3)
    whole = log_marginal_likelihood(vae, wrong, x, 3000)
    pyro.set_rng_seed(3)
    again = log_marginal_likelihood(vae, wrong, x, 3000)
    assert torch.equal(whole.log_px, again.log_px) and torch.equal(whole.khat, again.khat)
    pyro.set_rng_seed(3)
    chunked = log_marginal_likelihood(vae, wrong, x, 3000, chunk_size=500, batch_size=5)
    # Different chunks draw different z: the two agree within their Monte Carlo error.
    tolerance = 5 * (whole.stderr**2 + chunked.stderr**2).sqrt()
    assert ((chunked.log_px - whole.log_px).abs() <= tolerance).all()


def test_memory_budget_bounds_every_pass(ppca):
    vae, decoder, x, _ = ppca
    shapes = []

    def recording_guide(x: Tensor) -> None:
        with pyro.plate(DATA_PLATE, len(x)):
            z = pyro.sample(LATENT, PPCAPosterior(decoder, NOISE)(x))
        shapes.append(z.shape[:-1])

    result = log_marginal_likelihood(vae, recording_guide, x, 500, max_memory=60_000)
    passes = shapes[1:]  # the first call is the input check on two points
    assert sum(p * b for p, b in passes) == len(x) * 500
    assert len(passes) > 1 and max(p * b for p, b in passes) <= 500
    assert torch.isfinite(result.log_px).all()


def test_real_vae_parts_and_dataset_export():
    torch.manual_seed(0)
    vae = VAE(StandardNormal(3), Decoder(3, 8, hidden=[16]), Bernoulli())
    guide = AmortizedGuide(DiagonalNormal(8, 3, hidden=[16]))
    x = torch.bernoulli(torch.full((6, 8), 0.3))
    result = log_marginal_likelihood(vae, guide, x, 50, bounds=[1, 5], return_log_weights=True)
    assert result.log_px.shape == (6,) and result.log_px.dtype == torch.float64
    assert list(result.iwae) == [1, 5] and result.num_samples == 50
    assert torch.isfinite(result.khat).all()
    assert (result.log_px >= result.elbo).all()
    ds = result.to_dataset()
    assert ds["log_px"].dims == ("point",) and ds["iwae"].shape == (6, 2)
    assert ds["log_weights"].shape == (6, 50) and ds.attrs["num_samples"] == 50
    assert "log_weights" not in log_marginal_likelihood(vae, guide, x, 50).to_dataset()


def _heavy_tailed_log_weights(khat: float = 1.0, shape: tuple[int, int] = (4, 4000)) -> Tensor:
    """Logs of 1 + generalized-Pareto draws: tail index ``khat`` on the right, bounded reciprocals.

    Negated, they are the logs of weights in (0, 1], whose k̂ is far below 0.5.
    """
    u = np.random.default_rng(0).uniform(size=shape)
    return torch.from_numpy(np.log1p(((1 - u) ** -khat - 1) / khat))


def test_pareto_khat_sign_convention():
    heavy = _heavy_tailed_log_weights()
    assert (pareto_khat(heavy) > 0.7).all()
    # The reciprocal weights are bounded: a flipped sign convention would swap the two.
    assert (pareto_khat(-heavy) < 0.5).all()
    equal = pareto_khat(torch.zeros(3, 1000, dtype=torch.float64))
    assert torch.equal(equal, torch.zeros(3, dtype=torch.float64))
    assert pareto_khat(torch.randn(2, 10)).isnan().all()  # too few draws for a tail fit


def _khat_cases() -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(0)
    normal = torch.randn(64, 5000, generator=g, dtype=torch.float64)
    return {
        "normal K=25": normal[:, :25],
        "normal K=100": 3 * normal[:, :100],
        "normal K=5000": 5 * normal,
        "heavy k=1": _heavy_tailed_log_weights(1.0, (16, 4000)),
        "heavy k=0.3": _heavy_tailed_log_weights(0.3, (16, 1000)),
        "bounded": -_heavy_tailed_log_weights(1.0, (16, 500)),
        # Ties at the cutoff shorten some rows' tails, and some tails to nothing.
        "ties": torch.randint(0, 6, (64, 200), generator=g).double(),
        "few ties": torch.randint(0, 60, (64, 200), generator=g).double() / 7,
        # Weights far below the largest underflow: the tail is cut at the smallest double.
        "underflow": 1e3 * normal[:16, :300] - 1e4,
        "flat and non-finite": torch.cat(
            [torch.zeros(2, 100), torch.full((1, 100), -math.inf), normal[:2, :100]]
        ),
    }


@pytest.mark.parametrize("case", list(_khat_cases()))
def test_batched_khat_matches_arviz(case):
    """The batched torch fit is ArviZ's fit: same k̂ to 1e-6, NaN where ArviZ has none."""
    log_weights = _khat_cases()[case]
    reference = pareto_khat(log_weights, backend="arviz")
    fast = pareto_khat(log_weights)
    assert torch.equal(fast.isnan(), reference.isnan())
    torch.testing.assert_close(fast, reference, atol=1e-6, rtol=0, equal_nan=True)


def test_batched_khat_keeps_the_shape_and_refuses_unknown_backends():
    log_weights = _heavy_tailed_log_weights(1.0, (6, 400)).reshape(2, 3, 400)
    assert pareto_khat(log_weights).shape == (2, 3)
    with pytest.raises(ValueError, match="backend must be 'torch' or 'arviz'"):
        pareto_khat(log_weights, backend="numpy")


@pytest.mark.gpu
def test_batched_khat_on_the_gpu_matches_arviz():
    log_weights = _khat_cases()["heavy k=1"]
    fast = pareto_khat(log_weights.cuda())
    assert fast.device.type == "cuda"
    torch.testing.assert_close(
        fast.cpu(), pareto_khat(log_weights, backend="arviz"), atol=1e-6, rtol=0
    )


@pytest.mark.parametrize("backend", [_khat_arviz, _khat_arviz_stats], ids=["arviz<1", "arviz>=1"])
def test_psis_backends_take_log_weights(backend):
    if backend is _khat_arviz_stats:
        pytest.importorskip("arviz_stats")
    heavy = _heavy_tailed_log_weights().numpy()
    assert (backend(heavy) > 0.7).all() and (backend(-heavy) < 0.5).all()


def _no_observation(x: Tensor) -> None:
    with pyro.plate(DATA_PLATE, len(x)):
        pyro.sample(LATENT, dist.Normal(torch.zeros(LATENT_DIM, dtype=x.dtype), 1).to_event(1))


def _global_latent(x: Tensor) -> None:
    scale = pyro.sample("scale", dist.LogNormal(torch.tensor(0.0, dtype=x.dtype), 1.0))
    with pyro.plate(DATA_PLATE, len(x)):
        pyro.sample(OBSERVED, dist.Normal(torch.zeros_like(x), scale).to_event(1), obs=x)


def _global_guide(x: Tensor) -> None:
    pyro.sample("scale", dist.LogNormal(torch.tensor(0.0, dtype=x.dtype), 0.1))


def _z2_only_guide(x: Tensor) -> None:
    with pyro.plate(DATA_PLATE, len(x)):
        pyro.sample(
            "z2", dist.Normal(torch.zeros(len(x), LATENT_DIM, dtype=x.dtype), 1).to_event(1)
        )


@pytest.mark.parametrize(
    "case, match",
    [
        ("zero_samples", "num_samples must be an integer >= 1"),
        ("empty", "x is empty"),
        ("one_dimensional", r"x must have shape \(num_points, \*features\)"),
        ("wrong_features", r"guide failed on x of shape \(4, 6\)"),
        ("no_observed_site", "the model has no observed site"),
        ("guide_misses_latent", r"no site for the model's latent site\(s\) \['z1'\]"),
        ("global_latent", "site 'scale' is outside the data plate"),
        ("bound_above_k", r"bounds must be integers in \[1, num_samples=10\]"),
    ],
)
def test_bad_input_is_one_clear_value_error(ppca, case, match):
    vae, decoder, x, _ = ppca
    guide = AmortizedGuide(PPCAPosterior(decoder, NOISE))
    model, args, kwargs = vae, (x, 10), {}
    if case == "zero_samples":
        args = (x, 0)
    elif case == "empty":
        args = (x[:0], 10)
    elif case == "one_dimensional":
        args = (x[0], 10)
    elif case == "wrong_features":
        args = (torch.zeros(4, FEATURES + 1, dtype=x.dtype), 10)
    elif case == "no_observed_site":
        model = _no_observation
    elif case == "guide_misses_latent":
        model, guide = HierarchicalModel(), _z2_only_guide
    elif case == "global_latent":
        model, guide = _global_latent, _global_guide
    elif case == "bound_above_k":
        kwargs = {"bounds": [1, 100]}
    with pytest.raises(ValueError, match=match) as info:
        log_marginal_likelihood(model, guide, *args, **kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.gpu
def test_cuda_matches_cpu(ppca):
    vae, decoder, x, log_px = ppca
    guide = AmortizedGuide(PPCAPosterior(decoder, NOISE))
    result = log_marginal_likelihood(vae.cuda(), guide.cuda(), x.cuda(), 500)
    torch.testing.assert_close(result.log_px, log_px, atol=1e-6, rtol=0)
    # Data left on the CPU go to the programs' device.
    result = log_marginal_likelihood(vae, guide, x, 500)
    torch.testing.assert_close(result.log_px, log_px, atol=1e-6, rtol=0)


def test_arvizs_daily_banner_does_not_reach_a_user(tmp_path):
    """ArviZ 0.x warns about its refactor on its first import each day (stamped in the user's
    cache); scoring k̂ through pyrovae must not pass that on."""
    import os
    import subprocess
    import sys

    code = (
        "from pyrovae.inference.algorithms.psis import pareto_khat\n"
        "import torch\n"
        "print(pareto_khat(torch.randn(3, 100, dtype=torch.float64)).shape)\n"
    )
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}  # a day on which ArviZ never ran
    done = subprocess.run(
        [sys.executable, "-W", "error::FutureWarning", "-c", code],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "ArviZ is undergoing" not in done.stderr


def test_traced_passes_give_pyros_estimate(capsys):
    """compile="on" scores the passes through a verified, compiled trace of the same draws."""
    torch.manual_seed(0)
    vae = VAE(StandardNormal(3), Decoder(3, 8, hidden=[16]), Bernoulli())
    guide = AmortizedGuide(DiagonalNormal(8, 3, hidden=[16]))
    x = torch.bernoulli(torch.full((12, 8), 0.3), generator=torch.Generator().manual_seed(1))
    results = {}
    for mode in ("off", "on"):
        torch.manual_seed(3)
        results[mode] = log_marginal_likelihood(
            vae, guide, x, 200, chunk_size=50, batch_size=4, compile=mode
        )
    for name in ("log_px", "khat", "elbo", "kl", "reconstruction"):
        on, off = getattr(results["on"], name), getattr(results["off"], name)
        torch.testing.assert_close(on, off, atol=1e-5, rtol=1e-5)
    assert "runs eagerly" not in capsys.readouterr().err  # the trace was kept
    with pytest.raises(ValueError, match="compile must be one of auto, on, off"):
        log_marginal_likelihood(vae, guide, x, 10, compile="fast")


def test_standard_error_is_scipys_sem_and_nan_below_two_points():
    """Every reported ± is this function; scipy.stats.sem (ddof = 1) is the reference."""
    from scipy.stats import sem

    values = torch.randn(257, dtype=torch.float64) * 3 - 85
    assert standard_error(values) == pytest.approx(sem(values.numpy()), rel=1e-12)
    assert standard_error(values[:2]) == pytest.approx(sem(values[:2].numpy()), rel=1e-12)
    assert math.isnan(standard_error(values[:1]))
    assert math.isnan(standard_error(values[:0]))
