"""The 8-bit discretized logistic and its mixture against the logistic CDF, and ``bits_per_dim``."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import AffineTransform, SigmoidTransform, TransformedDistribution, Uniform

from pyrovae.model import (
    LIKELIHOODS,
    DiscretizedLogistic,
    DiscretizedLogisticMixture,
    EightBitLogistic,
    EightBitLogisticMixture,
    bits_per_dim,
)

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


# --- the mixture --------------------------------------------------------------------------


def mixture_parameters(batch: int, channels: int, pixels: int, k: int, seed: int = 0):
    """Random logits, locations (some beyond [0, 1]) and scales (1e-3 to 1) in float64."""
    generator = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(batch, k, pixels, generator=generator, dtype=torch.float64)
    loc = 1.4 * torch.rand(batch, k, channels, pixels, generator=generator, dtype=torch.float64)
    log_scale = torch.empty_like(loc).uniform_(math.log(1e-3), 0.0, generator=generator)
    return logits, loc - 0.2, log_scale.exp()


def all_values(channels: int, levels: int) -> torch.Tensor:
    """Every pixel of ``channels`` values on ``levels`` levels, ``(levels ** channels, C)``."""
    grid = torch.arange(levels, dtype=torch.float64) / (levels - 1)
    return torch.cartesian_prod(*[grid] * channels).reshape(-1, channels)


@pytest.mark.parametrize("channels, levels", [(1, 256), (2, 256), (3, 16)])
def test_mixture_pmf_sums_to_one_over_every_pixel_value(channels: int, levels: int):
    """A pixel's pmf over all ``levels ** C`` colours sums to one (float64, 1e-10)."""
    d = DiscretizedLogisticMixture(*mixture_parameters(6, channels, 1, 4), levels=levels)
    total = d.log_prob(all_values(channels, levels)[:, None, :]).logsumexp(0)
    torch.testing.assert_close(total, torch.zeros(6, dtype=torch.float64), atol=1e-10, rtol=0)


def test_an_rgb_pixels_pmf_sums_to_one_over_all_256_cubed_colours():
    """Three channels at 256 levels each: every one of the 16.7 million colours of a pixel,
    scored in chunks of 65,536 (one red level each), sums to one (float64, 1e-10)."""
    d = DiscretizedLogisticMixture(*mixture_parameters(1, 3, 1, 2, seed=3))
    grid = torch.arange(256, dtype=torch.float64) / 255
    rest = torch.cartesian_prod(grid, grid)  # (65536, 2): green and blue
    chunks = []
    for red in grid:
        colours = torch.cat([red.expand(len(rest), 1), rest], 1)  # (65536, 3)
        chunks.append(d.log_prob(colours[:, None, :]).logsumexp(0))
    total = torch.stack(chunks).logsumexp(0)
    torch.testing.assert_close(total, torch.zeros(1, dtype=torch.float64), atol=1e-10, rtol=0)


def test_mixture_matches_the_logistic_cdf_differences():
    """log P(x) of 3-channel pixels against sum_k pi_k prod_c [F(b+) - F(b-)] computed with
    torch's logistic CDF in float64 (levels 0 and 1 extend to -inf and +inf), wherever the
    oracle's differences are resolved (above 1e-8): 6 pixels, 3 components, 400 colours
    each, half drawn from the pixel's own mixture, half uniform, ends included."""
    logits, loc, scale = mixture_parameters(6, 3, 1, 3, seed=1)
    d = DiscretizedLogisticMixture(logits, loc, scale)
    torch.manual_seed(2)
    x = torch.cat([d.sample((200,)), torch.randint(0, 256, (200, 6, 3)).double() / 255])
    x[:20, :, 0], x[20:40, :, 1] = 0.0, 1.0
    unit = Uniform(torch.zeros((), dtype=torch.float64), torch.ones((), dtype=torch.float64))
    logistic = TransformedDistribution(unit, [SigmoidTransform().inv, AffineTransform(loc, scale)])
    value = x[:, :, None, :, None].expand(400, 6, 3, 3, 1)  # (N, pixels, K, C, P)
    upper = torch.where(value == 1, 1.0, logistic.cdf(value + 0.5 / 255))
    lower = torch.where(value == 0, 0.0, logistic.cdf(value - 0.5 / 255))
    oracle = (logits.softmax(-2) * (upper - lower).prod(-2)).sum(-2)[..., 0]  # (N, pixels)
    resolved = oracle > 1e-8
    assert resolved.sum() > 300
    log_p = d.log_prob(x)
    torch.testing.assert_close(log_p[resolved], oracle[resolved].log(), rtol=0, atol=1e-8)


def test_one_component_is_the_discretized_logistic():
    """K = 1: the same log p(x|z) and mean as ``EightBitLogistic`` reading the same loc and
    scale blocks, for 3-channel images."""
    features = 3 * 4 * 5
    params = torch.randn(2, 7, 3 * features, generator=torch.Generator().manual_seed(3))
    mixture = EightBitLogisticMixture(components=1, image_shape=(3, 4, 5), features=features)
    single = EightBitLogistic()(params[..., features:])
    d = mixture(params)
    x = torch.randint(0, 256, (7, features), generator=torch.Generator().manual_seed(4)) / 255
    assert d.event_shape == single.event_shape == (features,)
    torch.testing.assert_close(d.log_prob(x), single.log_prob(x), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(d.mean, single.mean, rtol=1e-5, atol=1e-6)


def test_the_channels_of_a_pixel_share_their_component():
    """Two components, black and white in every channel: a draw is a black or a white
    pixel, never a mixed one, in about equal numbers (within 5 binomial standard errors)."""
    loc = torch.tensor([0.0, 1.0])[:, None, None].expand(2, 3, 1)
    d = DiscretizedLogisticMixture(torch.zeros(2, 1), loc, torch.full((2, 3, 1), 1e-4))
    torch.manual_seed(0)
    x = d.sample((10_000,))
    assert ((x == 0).all(-1) | (x == 1).all(-1)).all()
    assert abs((x[:, 0] == 1).double().mean().item() - 0.5) < 5 * 0.5 / 100
    # The mean is the mixture's: grey in every channel.
    torch.testing.assert_close(d.mean, torch.full((3,), 0.5))


def test_mixture_samples_follow_the_pmf_and_its_mean():
    """Draws of a 2-channel pixel on 8 levels against its pmf over the 64 colours (within 5
    multinomial standard errors, plus float32 slack); the mean against the pmf's."""
    torch.manual_seed(0)
    logits, loc, scale = (p.float() for p in mixture_parameters(1, 2, 1, 3, seed=5))
    d = DiscretizedLogisticMixture(logits[0], loc[0], scale[0] + 0.1, levels=8)
    x = d.sample((200_000,))
    index = (x * 7).round()
    torch.testing.assert_close(x, index / 7)
    frequencies = torch.bincount((8 * index[:, 0] + index[:, 1]).long(), minlength=64).double()
    frequencies /= len(x)
    values = all_values(2, 8).float()
    pmf = d.log_prob(values).exp().double()
    assert ((frequencies - pmf).abs() <= 5 * (pmf * (1 - pmf) / len(x)).sqrt() + 1e-6).all()
    torch.testing.assert_close(d.mean.double(), (values.double() * pmf[:, None]).sum(0))


def test_mixture_likelihood_is_registered_and_checks_its_options():
    assert LIKELIHOODS["discretized_logistic_mixture"] is EightBitLogisticMixture
    likelihood = EightBitLogisticMixture(components=5, image_shape=(3, 2, 2), features=12)
    assert likelihood.num_params == 15 and likelihood.channels == 3 and likelihood.discrete
    for options, match in [
        ({"components": 0}, "components"),
        ({"min_scale": 0.0}, "min_scale"),
        ({"image_shape": (3, 2, 2), "features": 10}, "does not match"),
    ]:
        with pytest.raises(ValueError, match=match):
            EightBitLogisticMixture(**options)
