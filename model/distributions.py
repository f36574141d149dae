"""Distributions that torch and Pyro do not provide, written as Pyro ``TorchDistribution``\\ s."""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch import Size, Tensor
from torch.distributions import constraints
from torch.distributions.utils import broadcast_all
from torch.nn.functional import logsigmoid

_SCALAR = Size()


class TorchToPyro(dist.TorchDistribution):
    """A ``torch.distributions`` object as a Pyro distribution (what ``ZukoToPyro`` is for
    zuko): sampling, densities and moments are the wrapped distribution's own.

    Args:
        base: any ``torch.distributions.Distribution``.
    """

    arg_constraints: dict = {}

    def __init__(self, base: torch.distributions.Distribution) -> None:
        self.base_dist = base
        super().__init__(base.batch_shape, base.event_shape, validate_args=False)

    def expand(self, batch_shape: Size, _instance: TorchToPyro | None = None) -> TorchToPyro:
        return type(self)(self.base_dist.expand(batch_shape))

    @property
    def has_rsample(self) -> bool:
        return self.base_dist.has_rsample

    @constraints.dependent_property
    def support(self) -> constraints.Constraint:
        return self.base_dist.support

    @property
    def mean(self) -> Tensor:
        return self.base_dist.mean

    @property
    def variance(self) -> Tensor:
        return self.base_dist.variance

    def sample(self, sample_shape: Size = _SCALAR) -> Tensor:
        return self.base_dist.sample(sample_shape)

    def rsample(self, sample_shape: Size = _SCALAR) -> Tensor:
        return self.base_dist.rsample(sample_shape)

    def log_prob(self, value: Tensor) -> Tensor:
        return self.base_dist.log_prob(value)


def as_pyro(d: torch.distributions.Distribution) -> dist.TorchDistribution:
    """``d`` itself when it is a Pyro distribution, else wrapped in :class:`TorchToPyro`."""
    return d if isinstance(d, dist.torch_distribution.TorchDistributionMixin) else TorchToPyro(d)


class DiscretizedLogistic(dist.TorchDistribution):
    """A logistic distribution rounded to ``levels`` equally spaced values on [0, 1].

    The value ``k / (levels - 1)`` gets the logistic probability of the bin of half-width
    ``1 / (2 (levels - 1))`` around it; the first and last bins extend to -inf and +inf, so
    the pmf sums to one over the levels exactly (rounding a logistic draw and clipping it to
    [0, 1] gives the same distribution). Values are rounded to the nearest level before
    scoring, so data on a coarser grid are scored as their 8-bit quantization.

    Args:
        loc: location of the underlying logistic, on the [0, 1] scale.
        scale: its scale (positive).
        levels: number of levels, 256 for 8-bit data.
        validate_args: check the arguments (Pyro's default when None).

    References:
        PixelCNN++: Improving the PixelCNN with Discretized Logistic Mixture Likelihood and
        Other Modifications (Salimans et al., 2017)
    """

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive}
    support = constraints.unit_interval
    has_rsample = False

    def __init__(
        self, loc: Tensor, scale: Tensor, levels: int = 256, validate_args: bool | None = None
    ) -> None:
        if levels < 2:
            raise ValueError(f"levels must be at least 2, got {levels}")
        self.loc, self.scale = broadcast_all(loc, scale)
        self.levels = int(levels)
        super().__init__(self.loc.shape, validate_args=validate_args)

    def expand(self, batch_shape: Size, _instance: DiscretizedLogistic | None = None):
        new = self._get_checked_instance(DiscretizedLogistic, _instance)
        batch_shape = Size(batch_shape)
        new.loc = self.loc.expand(batch_shape)
        new.scale = self.scale.expand(batch_shape)
        new.levels = self.levels
        super(DiscretizedLogistic, new).__init__(batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        top = self.levels - 1
        level = (value * top).round().clamp(0, top)
        centre = (level / top - self.loc) / self.scale
        half_width = 0.5 / (top * self.scale)
        upper, lower = centre + half_width, centre - half_width
        # P(bin) = cdf(upper) - cdf(lower) = cdf(-lower) - cdf(-upper): take the form whose
        # terms are below 1/2, so that neither rounds to 1 far out in a tail.
        flip = centre > 0
        high = torch.where(flip, -lower, upper)
        low = torch.where(flip, -upper, lower)
        log_high = logsigmoid(high)
        # The clamp only bites when a bin is too narrow for floating point to resolve.
        log_ratio = (logsigmoid(low) - log_high).clamp(max=-1e-30)
        inner = log_high + torch.log(-torch.expm1(log_ratio))
        return torch.where(
            level == 0, logsigmoid(upper), torch.where(level == top, logsigmoid(-lower), inner)
        )

    @torch.no_grad()
    def sample(self, sample_shape: Size | tuple[int, ...] = ()) -> Tensor:
        shape = self._extended_shape(Size(sample_shape))
        u = torch.rand(shape, dtype=self.loc.dtype, device=self.loc.device)
        u = u.clamp(torch.finfo(u.dtype).tiny, 1 - torch.finfo(u.dtype).eps)
        x = self.loc + self.scale * (u.log() - (-u).log1p())
        top = self.levels - 1
        return (x * top).round().clamp(0, top) / top

    @property
    def mean(self) -> Tensor:
        grid = torch.linspace(0, 1, self.levels, dtype=self.loc.dtype, device=self.loc.device)
        grid = grid.reshape(-1, *(1,) * len(self.batch_shape))
        return (grid * self.log_prob(grid).exp()).sum(0)


class FullRankNormal(dist.MultivariateNormal):
    """A ``MultivariateNormal`` that knows its KL divergence to a diagonal Gaussian.

    torch registers the KL of a ``MultivariateNormal`` against another one only; this class
    (the full-covariance guide's distribution) adds the closed form against
    ``Normal(loc, scale).to_event(1)``, which ``analytic_kl`` and Pyro's
    ``TraceMeanField_ELBO`` then use. The registration is for this class alone, so
    ``kl_divergence`` of torch's own classes behaves as torch defines it.
    """


@torch.distributions.kl.register_kl(FullRankNormal, dist.Independent)
def _kl_full_rank_diagonal_normal(q: FullRankNormal, p: dist.Independent) -> Tensor:
    """KL(N(mu, L L^T) || N(m, diag(s^2))) in closed form."""
    base = p.base_dist
    if not (isinstance(base, dist.Normal) and p.reinterpreted_batch_ndims == 1):
        raise NotImplementedError
    scale = base.scale.expand(torch.broadcast_shapes(q.loc.shape, base.scale.shape))
    trace = (q.scale_tril / scale.unsqueeze(-1)).square().sum((-2, -1))
    mahalanobis = ((q.loc - base.loc) / scale).square().sum(-1)
    log_det = 2 * scale.log().sum(-1) - 2 * q.scale_tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    return 0.5 * (trace + mahalanobis - q.loc.shape[-1] + log_det)
