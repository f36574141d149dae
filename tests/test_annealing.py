"""Annealed importance sampling and BDMC against probabilistic PCA's closed-form log p(x),
in float64; the HMC kernel against a known Gaussian."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from ppca import PPCAPosterior, ppca_log_px
from torch import nn

from pyrovae.guides import AmortizedGuide
from pyrovae.inference import log_marginal_likelihood
from pyrovae.inference.algorithms.annealing import (
    annealed_log_marginal_likelihood,
    annealing_schedule,
)
from pyrovae.inference.algorithms.bdmc import bdmc
from pyrovae.inference.algorithms.hmc import hmc_transition
from pyrovae.model import VAE, Gaussian, StandardNormal

LATENT, FEATURES = 2, 5


def ppca() -> tuple[VAE, float]:
    """A fixed probabilistic PCA model and its noise scale."""
    torch.manual_seed(1)
    decoder = nn.Linear(LATENT, FEATURES).double()
    model = VAE(StandardNormal(LATENT).double(), decoder, Gaussian(scale=0.5).double())
    return model, model.likelihood.log_scale.exp().item()


def data(model: VAE, n: int) -> torch.Tensor:
    pyro.set_rng_seed(2)
    return model.sample(n, mean=False)


def test_schedules_run_from_zero_to_one():
    for name in ("sigmoid", "linear"):
        betas = annealing_schedule(name, 50)
        assert betas[0] == 0 and betas[-1] == 1 and (betas.diff() > 0).all()
    sigmoid = annealing_schedule("sigmoid", 100).diff()
    assert sigmoid[0] < sigmoid[50] > sigmoid[-1]  # dense at both ends
    with pytest.raises(ValueError, match="valid: sigmoid, linear"):
        annealing_schedule("cubic", 10)


@pytest.mark.parametrize("name", ["sigmoid", "linear"])
def test_with_the_exact_posterior_every_log_weight_is_log_px(name):
    """Then f_b = q(z|x) p(x)^b: each increment is (b_t - b_(t-1)) log p(x) whatever z is."""
    model, noise = ppca()
    x = data(model, 6)
    guide = AmortizedGuide(PPCAPosterior(model.decoder, noise))
    ais = annealed_log_marginal_likelihood(
        model, guide, x, num_chains=3, num_steps=7, schedule=name, leapfrog_steps=3
    )
    exact = ppca_log_px(model.decoder, noise, x).detach()
    torch.testing.assert_close(ais.log_weights, exact[:, None].expand(6, 3), atol=1e-9, rtol=0)
    assert ais.evaluations == 7 * (3 + 2)


def test_ais_corrects_a_poor_guide_where_importance_sampling_cannot():
    """A shifted, too narrow guide: IS at K = 1000 is off by more than 0.3 nats with k̂ > 0.7
    for most points;
    AIS with 64 chains and 300 steps lands within 0.05 nats on average."""
    model, noise = ppca()
    x = data(model, 8)
    exact = ppca_log_px(model.decoder, noise, x).detach()
    guide = AmortizedGuide(PPCAPosterior(model.decoder, noise, shift=1.0, widen=0.4))
    pyro.set_rng_seed(0)
    is_result = log_marginal_likelihood(model, guide, x, num_samples=1000)
    assert (exact - is_result.log_px).mean() > 0.3 and (is_result.khat > 0.7).double().mean() > 0.5
    pyro.set_rng_seed(0)
    ais = annealed_log_marginal_likelihood(model, guide, x, num_chains=64, num_steps=300)
    assert (ais.log_px - exact).abs().mean() < 0.05
    assert 0.4 < ais.acceptance.mean() < 0.95  # adapted towards 0.65


def test_bdmc_brackets_log_px_and_its_gap_falls_with_steps():
    model, noise = ppca()
    guide = AmortizedGuide(PPCAPosterior(model.decoder, noise, shift=0.8, widen=0.5))
    example = data(model, 1)
    gaps = []
    for steps in (5, 100):
        pyro.set_rng_seed(3)
        result = bdmc(model, guide, num_points=20, example=example, num_chains=4, num_steps=steps)
        exact = ppca_log_px(model.decoder, noise, result.x).detach()
        # Lower and upper bounds in expectation: on average over 20 points, up to 0.05 nats.
        assert result.lower.mean() <= exact.mean() + 0.05
        assert result.upper.mean() >= exact.mean() - 0.05
        gaps.append(result.gap)
    assert gaps[1] < gaps[0] and gaps[1] < 0.2


def test_the_hmc_kernel_leaves_a_gaussian_invariant():
    """2,000 chains started from N(mu, diag(sd^2)): after 50 transitions the moments hold,
    within 5 standard errors (about 0.1 for the mean, 0.15 for the variance here)."""
    torch.manual_seed(4)
    mu = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    sd = torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)
    target = dist.Normal(mu, sd).to_event(1)
    z = {"z": target.sample((2000, 1))}
    for _ in range(50):
        z, accept = hmc_transition(
            z, lambda s: target.log_prob(s["z"]), torch.tensor([0.4]), leapfrog_steps=5
        )
    samples = z["z"].reshape(-1, 3)
    torch.testing.assert_close(samples.mean(0), mu, atol=5 * (sd / 2000**0.5).max().item(), rtol=0)
    torch.testing.assert_close(
        samples.var(0) / sd**2, torch.ones(3, dtype=torch.float64), atol=0.15, rtol=0
    )
    assert 0.3 < accept.mean() < 1.0


def test_bad_settings_are_one_line():
    model, noise = ppca()
    guide = AmortizedGuide(PPCAPosterior(model.decoder, noise))
    x = data(model, 2)
    for kwargs, message in [
        ({"num_chains": 0}, "num_chains must be an integer >= 1"),
        ({"target_accept": 1.5}, r"target_accept must be in \(0, 1\)"),
        ({"init": "data"}, "init must be 'guide' or 'prior'"),
    ]:
        with pytest.raises(ValueError, match=message):
            annealed_log_marginal_likelihood(model, guide, x, **kwargs)


def test_ais_from_the_prior_also_converges():
    model, noise = ppca()
    x = data(model, 4)
    exact = ppca_log_px(model.decoder, noise, x).detach()
    guide = AmortizedGuide(PPCAPosterior(model.decoder, noise))
    pyro.set_rng_seed(5)
    ais = annealed_log_marginal_likelihood(
        model, guide, x, num_chains=8, num_steps=300, init="prior"
    )
    assert (ais.log_px - exact).abs().mean() < 0.1


def test_the_commands_take_the_ais_method_and_bdmc(tmp_path, capsys):
    import json

    from pyrovae.inference.cli import main

    run = str(tmp_path / "run")
    small = [
        "--set",
        "model.latent_dim=2",
        "--set",
        "model.decoder.hidden=[16]",
        "--set",
        "guide.encoder.hidden=[16]",
        "--no-progress",
    ]
    assert main(["train", "--out", run, "--epochs", "1", *small]) == 0
    capsys.readouterr()
    ais = ["evaluate", run, "--method", "ais", "--chains", "2", "--steps", "5", "--limit", "4"]
    assert main(ais) == 0
    out = capsys.readouterr().out
    assert "AIS, 2 chains x 5 steps" in out and "HMC acceptance" in out
    saved = json.loads((tmp_path / "run" / "evaluation.json").read_text())
    assert saved["method"] == "ais" and saved["num_steps"] == 5 and saved["num_samples"] is None
    assert len(saved["per_point"]["acceptance"]) == 4
    # An importance-sampling evaluation does not silently replace it.
    assert main(["evaluate", run, "-k", "30", "--limit", "4"]) == 2
    assert "method 'ais' -> 'is'" in capsys.readouterr().err
    assert main(["bdmc", run, "-n", "3", "--steps", "5", "--chains", "2"]) == 0
    out = capsys.readouterr().out
    assert "lower bound" in out and "upper bound" in out and "gap" in out
    gap = float(out.split("gap")[1].split()[0])
    # A negative gap is possible with 5 steps; then the line says why.
    assert ("hold in expectation only" in out) == (gap < 0)
    compare = ["compare", run, run, "--method", "ais", "--steps", "5", "--chains", "2"]
    assert main([*compare, "--limit", "4", "-k", "5"]) == 0
    out = capsys.readouterr().out
    assert "+0.000 ± 0.000" in out and "AIS with 2 chains x 5 steps" in out
