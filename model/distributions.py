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
        return discretized_logistic_log_prob(value, self.loc, self.scale, self.levels)

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
        return discretized_logistic_mean(self.loc, self.scale, self.levels)


def discretized_logistic_log_prob(value: Tensor, loc: Tensor, scale: Tensor, levels: int) -> Tensor:
    """log P(value) of a logistic ``(loc, scale)`` rounded to ``levels`` values on [0, 1],
    elementwise (see :class:`DiscretizedLogistic`): the one place this pmf is computed."""
    top = levels - 1
    level = (value * top).round().clamp(0, top)
    inverse_scale = scale.reciprocal()
    centre = (level / top - loc) * inverse_scale
    half_width = inverse_scale * (0.5 / top)
    # The end bins reach to -inf and +inf: the same formula then gives their probability.
    upper = torch.where(level == top, torch.inf, centre + half_width)
    lower = torch.where(level == 0, -torch.inf, centre - half_width)
    # P(bin) = cdf(upper) - cdf(lower) = cdf(-lower) - cdf(-upper): take the form whose
    # terms are below 1/2, so that neither rounds to 1 far out in a tail.
    flip = centre > 0
    high = torch.where(flip, -lower, upper)
    low = torch.where(flip, -upper, lower)
    log_high = logsigmoid(high)
    # The clamp only bites when a bin is too narrow for floating point to resolve.
    log_ratio = (logsigmoid(low) - log_high).clamp(max=-1e-30)
    return log_high + torch.log(-torch.expm1(log_ratio))


def discretized_logistic_mean(loc: Tensor, scale: Tensor, levels: int) -> Tensor:
    """The mean of a discretized logistic, elementwise.

    A level index ``k`` in ``0 .. L-1`` has ``E[k] = sum_j P(k >= j)`` and
    ``P(k >= j) = sigmoid((loc - b_j) / scale)`` with ``b_j = (j - 1/2) / (L - 1)`` the bin
    edges, so the mean takes ``L - 1`` sigmoids, summed in chunks over the edges: memory stays
    a few times the parameters' whatever the number of levels.
    """
    top = levels - 1
    total = torch.zeros_like(loc * scale)
    edges = (torch.arange(1, levels, dtype=total.dtype, device=total.device) - 0.5) / top
    for chunk in edges.split(16):
        shaped = chunk.reshape(-1, *(1,) * total.dim())
        total = total + torch.sigmoid((loc - shaped) / scale).sum(0)
    return total / top


class DiscretizedLogisticMixture(dist.TorchDistribution):
    """A mixture of discretized logistics per pixel, shared by its colour channels: each pixel
    picks one of K components, and given it every channel is an independent
    :class:`DiscretizedLogistic` of that component's location and scale.

    For a pixel ``p`` with channels ``x_1 .. x_C``,
    ``P(x) = sum_k pi_k prod_c DL(x_c; loc_ck, scale_ck)``: sharing the choice of component
    across channels lets the mixture put mass on colours (channels that move together),
    which independent channels cannot. PixelCNN++ adds a linear dependence of each channel's
    location on the channels before it; this one does not. The event is the flattened image,
    ``C * P`` values channel-major (``(C, H, W)`` flattened).

    Args:
        logits: unnormalised log weights of the components, shape ``(..., K, P)``.
        loc: locations on the [0, 1] scale, shape ``(..., K, C, P)``.
        scale: scales (positive), shape ``(..., K, C, P)``.
        levels: number of levels, 256 for 8-bit data.
        validate_args: check the arguments (Pyro's default when None).

    References:
        PixelCNN++: Improving the PixelCNN with Discretized Logistic Mixture Likelihood and
        Other Modifications (Salimans et al., 2017)
    """

    arg_constraints = {
        "logits": constraints.real,
        "loc": constraints.real,
        "scale": constraints.positive,
    }
    support = constraints.independent(constraints.unit_interval, 1)
    has_rsample = False

    def __init__(
        self,
        logits: Tensor,
        loc: Tensor,
        scale: Tensor,
        levels: int = 256,
        validate_args: bool | None = None,
    ) -> None:
        if levels < 2:
            raise ValueError(f"levels must be at least 2, got {levels}")
        if loc.dim() < 3 or loc.shape != scale.shape:
            raise ValueError(
                f"loc and scale must share a shape (..., K, C, P), got {tuple(loc.shape)} and "
                f"{tuple(scale.shape)}"
            )
        k, channels, pixels = loc.shape[-3:]
        if logits.dim() < 2 or logits.shape[-2:] != (k, pixels):
            raise ValueError(
                f"logits must be (..., K, P) = (..., {k}, {pixels}), got {tuple(logits.shape)}"
            )
        batch_shape = torch.broadcast_shapes(logits.shape[:-2], loc.shape[:-3])
        self.logits = logits.expand(*batch_shape, k, pixels)
        self.loc = loc.expand(*batch_shape, k, channels, pixels)
        self.scale = scale.expand(*batch_shape, k, channels, pixels)
        self.levels = int(levels)
        super().__init__(batch_shape, Size([channels * pixels]), validate_args=validate_args)

    def expand(self, batch_shape: Size, _instance: DiscretizedLogisticMixture | None = None):
        new = self._get_checked_instance(DiscretizedLogisticMixture, _instance)
        batch_shape = Size(batch_shape)
        new.logits = self.logits.expand(*batch_shape, *self.logits.shape[-2:])
        new.loc = self.loc.expand(*batch_shape, *self.loc.shape[-3:])
        new.scale = self.scale.expand(*batch_shape, *self.scale.shape[-3:])
        new.levels = self.levels
        super(DiscretizedLogisticMixture, new).__init__(
            batch_shape, self.event_shape, validate_args=False
        )
        new._validate_args = self._validate_args
        return new

    @property
    def channels(self) -> int:
        return self.loc.shape[-2]

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        channels, pixels = self.loc.shape[-2:]
        # Components lead and pixels run innermost: the sums over channels and components
        # are then over outer dimensions, which vectorize.
        x = value.reshape(*value.shape[:-1], 1, channels, pixels)
        per_channel = discretized_logistic_log_prob(x, self.loc, self.scale, self.levels)
        joint = per_channel.sum(-2) + self.logits.log_softmax(-2)  # (..., K, P)
        return joint.logsumexp(-2).sum(-1)

    @torch.no_grad()
    def sample(self, sample_shape: Size | tuple[int, ...] = ()) -> Tensor:
        shape = Size(sample_shape) + self.batch_shape
        channels, pixels = self.loc.shape[-2:]
        weights = self.logits.movedim(-2, -1)  # (..., P, K)
        pick = dist.Categorical(logits=weights).sample(Size(sample_shape))  # (*shape, P)
        index = pick[..., None, None, :].expand(*shape, 1, channels, pixels)
        loc = self.loc.expand(*shape, *self.loc.shape[-3:]).gather(-3, index)[..., 0, :, :]
        scale = self.scale.expand(*shape, *self.scale.shape[-3:]).gather(-3, index)[..., 0, :, :]
        x = DiscretizedLogistic(loc, scale, self.levels, validate_args=False).sample()
        return x.reshape(*shape, channels * pixels)

    @property
    def mean(self) -> Tensor:
        weights = self.logits.softmax(-2).unsqueeze(-2)  # (..., K, 1, P)
        mean = discretized_logistic_mean(self.loc, self.scale, self.levels)
        return (mean * weights).sum(-3).flatten(-2)


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
