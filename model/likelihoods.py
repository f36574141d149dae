"""Likelihoods p(x|z): modules mapping decoder output to a distribution over x.

A likelihood's ``forward(params)`` takes the decoder output of shape ``(..., F * num_params)``
and returns a distribution with event shape ``(F,)``, where F is the number of data features.
``num_params`` (default 1 when absent) tells the builder how wide the decoder must be; with
more than one, parameter j of every feature is ``params.chunk(num_params, dim=-1)[j]``.
``support`` is the constraint the training data are checked against once, up front.
``discrete`` (default False when absent) says that ``log p(x|z)`` is a log-probability of
discrete values rather than a density, which decides the bits/dim convention
(:func:`bits_per_dim`).
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from torch import Tensor, nn
from torch.distributions import constraints
from torch.nn.functional import softplus

from pyrovae.model.distributions import DiscretizedLogistic, DiscretizedLogisticMixture
from pyrovae.model.networks import image_layout


class Bernoulli(nn.Module):
    """Independent Bernoulli pixels parameterised by logits: the binary cross-entropy loss.

    ``-log p(x|z)`` is exactly ``binary_cross_entropy_with_logits(logits, x, reduction="sum")``.
    Data must lie in [0, 1]; for grey levels that are not 0 or 1 the value is still the
    cross-entropy, but no longer a normalised density (use dynamic binarization for that).

    Args:
        bias_from_data: add a fixed per-pixel offset to the decoder's logits, the logit of
            the training data's mean (clipped to [0.001, 0.999]; set by ``fit`` through
            :meth:`initialize_from_data`): a decoder that has learned nothing yet then gives
            the mean image rather than noise. This is Burda et al.'s start for the output
            bias, and trains exactly as that start would (the decoder's own bias moves on
            top of the offset).
        features: number of data features F (filled in by the builder).

    References:
        Importance Weighted Autoencoders (Burda et al., 2016), code: ``iwae.py``
        (``get_train_bias_np``)
    """

    num_params = 1
    support = constraints.unit_interval
    discrete = True

    def __init__(self, bias_from_data: bool = False, features: int | None = None) -> None:
        super().__init__()
        if not isinstance(bias_from_data, bool):
            raise ValueError(f"bias_from_data must be true or false, got {bias_from_data!r}")
        self.bias_from_data = bias_from_data
        if bias_from_data:
            if not (features and features > 0):
                raise ValueError(f"bias_from_data needs the number of features, got {features}")
            self.register_buffer("bias", torch.zeros(features))

    @torch.no_grad()
    def initialize_from_data(self, x: Tensor) -> None:
        """With ``bias_from_data``, the offset becomes the logit of the data's mean per pixel."""
        if self.bias_from_data:
            mean = x.mean(0).clamp(0.001, 0.999)
            self.bias.copy_((mean.log() - (-mean).log1p()).to(self.bias))

    def forward(self, logits: Tensor) -> dist.Distribution:
        if self.bias_from_data:
            logits = logits + self.bias
        # Grey-level targets in [0, 1] are allowed (cross-entropy); the data are checked once
        # up front, so per-step support checks are switched off here.
        return dist.Bernoulli(logits=logits, validate_args=False).to_event(1)


class ContinuousBernoulli(nn.Module):
    """Independent continuous Bernoulli pixels on [0, 1], parameterised by logits.

    The cross-entropy of :class:`Bernoulli` plus its missing normalising constant, so that
    grey levels get a proper density on [0, 1].

    References:
        The Continuous Bernoulli: Fixing a Pervasive Error in Variational Autoencoders
        (Loaiza-Ganem and Cunningham, 2019)
    """

    num_params = 1
    support = constraints.unit_interval

    def __init__(self) -> None:
        super().__init__()

    def forward(self, logits: Tensor) -> dist.Distribution:
        return dist.ContinuousBernoulli(logits=logits).to_event(1)


MIN_START_SCALE = 0.01
"""The smallest scale a learned Gaussian or Laplace scale starts at (constant pixels have a
standard deviation of zero)."""


class _LocationScale(nn.Module):
    """Independent pixels of a location-scale ``family``: the location from the decoder, one
    scale fixed or learned (one in all, or one per feature)."""

    family: type[dist.Distribution]
    num_params = 1
    support = constraints.real

    def __init__(
        self,
        scale: float = 1.0,
        learn_scale: bool = False,
        per_feature: bool = False,
        scale_from_data: bool = True,
        features: int | None = None,
    ) -> None:
        super().__init__()
        if not scale > 0:
            raise ValueError(f"scale must be positive, got {scale}")
        if per_feature and not learn_scale:
            raise ValueError("per_feature needs learn_scale = true (a fixed scale is shared)")
        if per_feature and not (features and features > 0):
            raise ValueError(f"per_feature needs the number of features, got {features}")
        log_scale = torch.full((features,) if per_feature else (), math.log(scale))
        if learn_scale:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)
        self.scale_from_data = scale_from_data

    @torch.no_grad()
    def initialize_from_data(self, x: Tensor) -> None:
        """A learned scale starts at the data's standard deviation (per feature, or over all
        of them), floored at :data:`MIN_START_SCALE`: the scale of a decoder that has learned
        nothing yet. Fixed scales, and ``scale_from_data = false``, keep ``scale``."""
        if not (self.scale_from_data and isinstance(self.log_scale, nn.Parameter)):
            return
        std = x.std(0) if self.log_scale.dim() else x.std()
        self.log_scale.copy_(std.clamp(min=MIN_START_SCALE).log().to(self.log_scale))

    def forward(self, loc: Tensor) -> dist.Distribution:
        return self.family(loc, self.log_scale.exp().expand_as(loc)).to_event(1)


class Gaussian(_LocationScale):
    """Independent Gaussian pixels with mean given by the decoder.

    With a fixed ``scale`` s, ``-log p(x|z) = ||x - mean||^2 / (2 s^2) + F log(s sqrt(2 pi))``:
    the sum-of-squares (MSE) loss scaled by ``1 / (2 s^2)`` plus a constant. A smaller scale
    weights reconstruction more heavily against the KL term (like beta < 1); a larger one
    pushes towards the prior and blurrier reconstructions. ``learn_scale=True`` learns the
    scale by maximum likelihood instead: one global scale, or one per feature with
    ``per_feature=True``. For a scale per pixel and data point, predicted by the decoder, see
    :class:`HeteroscedasticGaussian`.

    Args:
        scale: the standard deviation, or its initial value when learned.
        learn_scale: learn the log-scale.
        per_feature: learn one scale per feature rather than one in all (needs
            ``learn_scale``).
        scale_from_data: a learned scale starts at the data's standard deviation (set by
            ``fit`` through :meth:`initialize_from_data`) rather than at ``scale``.
        features: number of data features F (filled in by the builder).
    """

    family = dist.Normal


class Laplace(_LocationScale):
    """Independent Laplace pixels with location given by the decoder: the L1 loss.

    With a fixed ``scale`` b, ``-log p(x|z) = ||x - loc||_1 / b + F log(2 b)``; ``scale``
    balances reconstruction against the KL term as in :class:`Gaussian`.

    Args:
        scale: the scale b, or its initial value when learned.
        learn_scale: learn the log-scale.
        per_feature: learn one scale per feature (needs ``learn_scale``).
        scale_from_data: a learned scale starts at the data's standard deviation.
        features: number of data features F (filled in by the builder).
    """

    family = dist.Laplace


class HeteroscedasticGaussian(nn.Module):
    """Independent Gaussian pixels whose mean and scale both come from the decoder.

    The decoder emits ``2 F`` numbers: the means, then unconstrained scales mapped through
    ``softplus(.) + min_scale``. The floor matters: on data with constant pixels (image
    borders) the maximum-likelihood scale is zero and the density unbounded.

    Args:
        min_scale: the smallest scale.
    """

    num_params = 2
    support = constraints.real

    def __init__(self, min_scale: float = 1e-3) -> None:
        super().__init__()
        if not min_scale > 0:
            raise ValueError(f"min_scale must be positive, got {min_scale}")
        self.min_scale = min_scale

    def forward(self, params: Tensor) -> dist.Distribution:
        loc, raw_scale = params.chunk(2, dim=-1)
        return dist.Normal(loc, softplus(raw_scale) + self.min_scale).to_event(1)


class EightBitLogistic(nn.Module):
    """Discretized logistic pixels: a normalised pmf over 8-bit grey levels ``k / 255``.

    The decoder emits ``2 F`` numbers: locations, then unconstrained scales mapped through
    ``softplus(.) + min_scale``. Data are on [0, 1]; values between levels are rounded to the
    nearest level. ``log p(x|z)`` is a log-probability (at most 0), so
    ``bits_per_dim(log_px, F)`` applies as is.

    Args:
        min_scale: the smallest scale of the underlying logistic.
        levels: number of grey levels.

    References:
        Improved Variational Inference with Inverse Autoregressive Flow (Kingma et al., 2016)
    """

    num_params = 2
    support = constraints.unit_interval
    discrete = True

    def __init__(self, min_scale: float = 1e-3, levels: int = 256) -> None:
        super().__init__()
        if not min_scale > 0:
            raise ValueError(f"min_scale must be positive, got {min_scale}")
        if int(levels) != levels or levels < 2:
            raise ValueError(f"levels must be an integer of at least 2, got {levels}")
        self.min_scale = min_scale
        self.levels = int(levels)

    def forward(self, params: Tensor) -> dist.Distribution:
        loc, raw_scale = params.chunk(2, dim=-1)
        scale = softplus(raw_scale) + self.min_scale
        return DiscretizedLogistic(loc, scale, self.levels).to_event(1)


class EightBitLogisticMixture(nn.Module):
    """A mixture of K discretized logistics per pixel over 8-bit levels, its component shared
    by the pixel's colour channels (:class:`~pyrovae.model.distributions.DiscretizedLogisticMixture`):
    PixelCNN++'s likelihood without its coupling of the channels' locations.

    The decoder emits ``3 K`` blocks of F numbers (F = ``C * H * W``): K blocks of logits,
    K of locations, K of unconstrained scales (``softplus(.) + min_scale``). A pixel's weights
    are the sum of its channels' logits. Data are on [0, 1], values between levels rounded to
    the nearest; ``log p(x|z)`` is a log-probability, so ``bits_per_dim(log_px, F)`` applies
    as is. With one component this is :class:`EightBitLogistic`.

    Args:
        components: K, the components per pixel.
        min_scale: the smallest scale of a component's logistic.
        levels: number of levels.
        image_shape: ``(C, H, W)`` of the data, for the channels that share a component
            (filled in by the builder); without it (or with ``(H, W)``) every value is its own
            pixel.
        features: number of data features F (filled in by the builder), checked against
            ``image_shape``.

    References:
        PixelCNN++: Improving the PixelCNN with Discretized Logistic Mixture Likelihood and
        Other Modifications (Salimans et al., 2017); Very Deep VAEs Generalize Autoregressive
        Models and Can Outperform Them on Images (Child, 2021)
    """

    support = constraints.unit_interval
    discrete = True

    def __init__(
        self,
        components: int = 10,
        min_scale: float = 1e-3,
        levels: int = 256,
        image_shape: tuple[int, ...] | None = None,
        features: int | None = None,
    ) -> None:
        super().__init__()
        if isinstance(components, bool) or int(components) != components or components < 1:
            raise ValueError(f"components must be an integer of at least 1, got {components!r}")
        if not min_scale > 0:
            raise ValueError(f"min_scale must be positive, got {min_scale}")
        if int(levels) != levels or levels < 2:
            raise ValueError(f"levels must be an integer of at least 2, got {levels}")
        self.components = int(components)
        self.num_params = 3 * self.components
        self.min_scale = min_scale
        self.levels = int(levels)
        self.channels = image_layout(image_shape, features)[0] if image_shape else 1

    def forward(self, params: Tensor) -> dist.Distribution:
        k, c = self.components, self.channels
        # A view, no copy: (..., 3 K F) is (logits, loc, scale) x K blocks of (C, P).
        blocks = params.reshape(*params.shape[:-1], 3, k, c, params.shape[-1] // (3 * k * c))
        logits = blocks[..., 0, :, :, :].sum(-2)
        loc = blocks[..., 1, :, :, :]
        scale = softplus(blocks[..., 2, :, :, :]) + self.min_scale
        return DiscretizedLogisticMixture(logits, loc, scale, self.levels, validate_args=False)


def bits_per_dim(log_px: Tensor | float, features: int, levels: int | None = None) -> Tensor:
    """Converts a log-likelihood in nats to bits per dimension.

    For a pmf over discrete levels (:class:`EightBitLogistic`,
    :class:`EightBitLogisticMixture`, Bernoulli on binary data), leave ``levels`` None:
    ``-log2 P(x) / F``, with F the values per point (``C * H * W`` for images, every colour
    channel of every pixel a dimension). For a density on data scaled to [0, 1]
    (:class:`Gaussian`, :class:`Laplace`, :class:`ContinuousBernoulli`), the standard
    convention reports the density of the data on the scale of the integer levels, which
    adds ``log2(levels)`` bits per dimension (8 for 256 levels): the density of x scaled by
    ``1 / levels`` is ``levels ** F`` times the density on the original scale. This is only
    comparable with pmfs for uniformly dequantized data (x + u, u ~ U(0, 1), divided by
    ``levels``); a density evaluated at undequantized discrete points can grow without bound.

    Args:
        log_px: log p(x) in nats, per data point (any shape).
        features: number of dimensions F.
        levels: number of integer levels the unit interval spans, for densities only.

    Returns:
        Bits per dimension, with the shape of ``log_px``.

    References:
        A note on the evaluation of generative models (Theis et al., 2016)
    """
    bits = -torch.as_tensor(log_px) / (features * math.log(2))
    return bits if levels is None else bits + math.log2(levels)


LIKELIHOODS: dict[str, type[nn.Module]] = {
    "bernoulli": Bernoulli,
    "continuous_bernoulli": ContinuousBernoulli,
    "gaussian": Gaussian,
    "heteroscedastic_gaussian": HeteroscedasticGaussian,
    "laplace": Laplace,
    "discretized_logistic": EightBitLogistic,
    "discretized_logistic_mixture": EightBitLogisticMixture,
}
"""Spec name -> likelihood constructor; the constructor's signature is the spec's schema."""
