"""The 8-bit discretized logistic against the logistic CDF, and ``bits_per_dim``."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import AffineTransform, SigmoidTransform, TransformedDistribution, Uniform

from pyrovae.model import DiscretizedLogistic, EightBitLogistic, bits_per_dim

LOC = torch.tensor([0.3, -2.0, 0.5, 1.5, 0.999, 0.5, 0.0])
SCALE = torch.tensor([1e-3, 0.1, 50.0, 0.02, 1e-4, 0.05, 3e-4])
LEVELS = torch.linspace(0, 1, 256)


def logistic_bin_probabilities(loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """P(level k) from the logistic CDF in float64, shape (256, len(loc)): the oracle."""
    loc, scale = loc.double(), scale.double()
    unit = Uniform(torch.zeros((), dtype=torch.float64), torch.ones((), dtype=torch.float64))
    logistic = TransformedDistribution(unit, [SigmoidTransform().inv, AffineTransform(loc, scale)])
    levels = (torch.arange(256, dtype=torch.float64) / 255)[:, None].expand(256, len(loc))
    upper = logistic.cdf(levels + 0.5 / 255)
    lower = logistic.cdf(levels - 0.5 / 255)
    upper[-1], lower[0] = 1.0, 0.0
    return upper - lower


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pmf_sums_to_one_over_the_levels(dtype: torch.dtype):
    d = DiscretizedLogistic(LOC.to(dtype), SCALE.to(dtype))
    total = d.log_prob(LEVELS.to(dtype)[:, None]).logsumexp(0)
    tolerance = 1e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(total, torch.zeros_like(total), atol=tolerance, rtol=0)


def test_pmf_matches_the_logistic_cdf():
    log_p = DiscretizedLogistic(LOC.double(), SCALE.double()).log_prob(LEVELS.double()[:, None])
    oracle = logistic_bin_probabilities(LOC, SCALE)
    # Where the oracle's CDF differences are accurate (not lost to cancellation in float64).
    resolved = oracle > 1e-8
    torch.testing.assert_close(log_p[resolved], oracle[resolved].log(), rtol=0, atol=1e-8)


def test_far_tails_stay_finite_with_finite_gradients():
    loc = torch.tensor([0.0, 1.0, 0.2, 0.9], requires_grad=True)
    scale = torch.full((4,), 1e-3)
    log_p = DiscretizedLogistic(loc, scale).log_prob(torch.tensor([1.0, 0.0, 0.8, 0.1]))
    # ~ -(distance to the bin) / scale: hundreds of nats, not -inf.
    assert torch.isfinite(log_p).all() and (log_p < -500).all()
    log_p.sum().backward()
    assert torch.isfinite(loc.grad).all() and (loc.grad != 0).all()


def test_off_grid_values_are_scored_as_their_nearest_level():
    d = DiscretizedLogistic(torch.tensor(0.4), torch.tensor(0.1))
    torch.testing.assert_close(d.log_prob(torch.tensor(0.5 + 0.4 / 255)), d.log_prob(LEVELS[128]))


def test_samples_lie_on_the_levels_with_the_pmf_frequencies():
    torch.manual_seed(0)
    d = DiscretizedLogistic(torch.tensor(0.02), torch.tensor(0.01))
    x = d.sample((200_000,))
    index = (x * 255).round()
    torch.testing.assert_close(x, index / 255)
    frequencies = torch.bincount(index.long(), minlength=256).double() / len(x)
    pmf = d.log_prob(LEVELS).exp().double()
    # Five binomial standard errors, plus float32 slack.
    assert ((frequencies - pmf).abs() <= 5 * (pmf * (1 - pmf) / len(x)).sqrt() + 1e-6).all()
    torch.testing.assert_close(d.mean.double(), (LEVELS.double() * pmf).sum())


def test_likelihood_reads_loc_then_scale_from_the_decoder_output():
    likelihood = EightBitLogistic(min_scale=1e-3)
    level = LEVELS[128].item()
    params = torch.cat([torch.full((2, 3), level), torch.full((2, 3), -20.0)], dim=-1)
    d = likelihood(params)
    assert d.event_shape == (3,) and d.batch_shape == (2,)
    # loc on a level and the scale at its floor (1e-3, a quarter of the bin width 1/255):
    # P(level) = sigmoid(1.96) - sigmoid(-1.96) per pixel.
    expected = torch.sigmoid(torch.tensor(0.5 / 255 / 1e-3)) * 2 - 1
    p = d.base_dist.log_prob(torch.full((2, 3), level)).exp()
    torch.testing.assert_close(p, expected.expand(2, 3), atol=1e-3, rtol=0)


def test_bits_per_dim():
    features = 64
    # A uniform pmf over 256 levels costs exactly 8 bits per dimension.
    assert bits_per_dim(features * -math.log(256), features).item() == pytest.approx(8.0)
    # A uniform density on [0, 1] (log p = 0) is 8 bits per dimension on the 256-level scale.
    assert bits_per_dim(0.0, features, levels=256).item() == pytest.approx(8.0)
    log_px = torch.tensor([-100.0, -200.0])
    expected = 100.0 / (features * math.log(2))
    torch.testing.assert_close(bits_per_dim(log_px, features), torch.tensor([1.0, 2.0]) * expected)
