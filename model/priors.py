"""Priors p(z): modules whose ``forward()`` returns a distribution with event shape ``(latent_dim,)``."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pyro.distributions as dist
import torch
from pyro.contrib.zuko import ZukoToPyro
from torch import Tensor, nn
from torch.distributions import constraints

from pyrovae.model.flows import autoregressive_flow


class StandardNormal(nn.Module):
    """The standard normal prior N(0, I) over ``latent_dim`` dimensions.

    Args:
        latent_dim: dimension of z.

    Example:
        >>> StandardNormal(2)().event_shape
        torch.Size([2])
    """

    def __init__(self, latent_dim: int) -> None:
        super().__init__()
        _check_latent_dim(latent_dim)
        # Buffers follow the module across devices and dtypes.
        self.register_buffer("loc", torch.zeros(latent_dim))
        self.register_buffer("scale", torch.ones(latent_dim))

    def forward(self) -> dist.Distribution:
        return dist.Normal(self.loc, self.scale).to_event(1)


class LearnedNormal(nn.Module):
    """A diagonal Gaussian prior N(loc, diag(scale^2)) with learned loc and scale.

    Starts as N(0, I). With a Gaussian guide and decoder it adds nothing a reparametrisation
    of z could not absorb, but it lets unused dimensions shrink or shift freely.

    Args:
        latent_dim: dimension of z.
    """

    def __init__(self, latent_dim: int) -> None:
        super().__init__()
        _check_latent_dim(latent_dim)
        self.loc = nn.Parameter(torch.zeros(latent_dim))
        self.log_scale = nn.Parameter(torch.zeros(latent_dim))

    def forward(self) -> dist.Distribution:
        return dist.Normal(self.loc, self.log_scale.exp()).to_event(1)


class LabelNormal(nn.Module):
    """A learned Gaussian prior per class, p(z | y) = N(loc_y, diag(scale_y^2)), for a
    conditional VAE (``model.labels = "context"``): the labels are context of the prior too.

    Starts as N(0, I) for every class. ``reads_labels`` tells the model to call it with the
    rows' one-hot labels; called without them it is the marginal p(z) = mean_y p(z | y), a
    mixture.

    Args:
        latent_dim: dimension of z.
        classes: number of classes (the spec fills in ``model.classes``).

    References:
        Learning Structured Output Representation using Deep Conditional Generative Models
        (Sohn, Lee and Yan, 2015): the conditional prior network p(z | y)
    """

    reads_labels = True

    def __init__(self, latent_dim: int, classes: int = 10) -> None:
        super().__init__()
        _check_latent_dim(latent_dim)
        _check_components(classes)
        self.loc = nn.Parameter(torch.zeros(classes, latent_dim))
        self.log_scale = nn.Parameter(torch.zeros(classes, latent_dim))

    def forward(self, labels: Tensor | None = None) -> dist.Distribution:
        """p(z | y) for one-hot ``labels (..., classes)``, batch shape ``labels.shape[:-1]``;
        the marginal over equally likely classes without them."""
        if labels is None:
            weights = dist.Categorical(logits=torch.zeros_like(self.loc[:, 0]))
            components = dist.Normal(self.loc, self.log_scale.exp()).to_event(1)
            return dist.MixtureSameFamily(weights, components)
        labels = labels.to(self.loc)
        return dist.Normal(labels @ self.loc, (labels @ self.log_scale).exp()).to_event(1)


class MixtureOfNormals(nn.Module):
    """A learned mixture of ``components`` diagonal Gaussians.

    Starts close to N(0, I), where the standard prior is: equal weights, unit scales and
    means drawn from N(0, 0.1^2 I), near zero but apart, so that the components can separate
    as training finds clusters in the aggregate posterior.

    Args:
        latent_dim: dimension of z.
        components: number of mixture components K (at least one).

    References:
        Deep Unsupervised Clustering with Gaussian Mixture Variational Autoencoders
        (Dilokthanakul et al., 2016)
    """

    def __init__(self, latent_dim: int, components: int = 10) -> None:
        super().__init__()
        _check_latent_dim(latent_dim)
        _check_components(components)
        self.logits = nn.Parameter(torch.zeros(components))
        self.loc = nn.Parameter(0.1 * torch.randn(components, latent_dim))
        self.log_scale = nn.Parameter(torch.zeros(components, latent_dim))

    def forward(self) -> dist.Distribution:
        return dist.MixtureSameFamily(
            dist.Categorical(logits=self.logits),
            dist.Normal(self.loc, self.log_scale.exp()).to_event(1),
        )


MAX_COMPONENT_PAIRS = 2**16
"""(value, component) pairs a :class:`UniformMixture` scores or draws at once."""


def _sizes(total: int, size: int) -> list[int]:
    return [min(size, total - start) for start in range(0, total, size)]


def _is_diagonal_normal(components: dist.Distribution) -> bool:
    """Whether ``components`` are ``Normal(loc, scale).to_event(1)`` with batch shape (K,)."""
    return (
        isinstance(components, torch.distributions.Independent)
        and type(components.base_dist) in (torch.distributions.Normal, dist.Normal)
        and components.reinterpreted_batch_ndims == 1
        and len(components.batch_shape) == 1
    )


def _gaussian_mixture_log_prob(z: Tensor, right: Tensor) -> Tensor:
    """``logsumexp_k log N(z; loc_k, diag(scale_k^2))`` for rows z of shape ``(N, D)``.

    ``right`` holds, per component, ``[1 / scale^2, -2 loc / scale^2, c]`` with ``c`` the
    sum of ``loc^2 / scale^2 + 2 log scale`` and ``D log(2 pi)``, so that minus twice each
    log density is one entry of ``[z^2, z, 1] @ right.T``."""
    left = torch.cat([z.square(), z, torch.ones_like(z[:, :1])], -1)
    return (-0.5 * (left @ right.T)).logsumexp(-1)


class UniformMixture(dist.TorchDistribution):
    """The equally weighted mixture of the components of a distribution along its last batch dim.

    ``log_prob(z) = logsumexp_k log q_k(z) - log K``: ``z`` gets a component dim inserted
    before the event dims and is broadcast against the K components, so one batched call
    scores every (point, component) pair. Any distribution with batch shape ``(..., K)``
    serves as components, including a ``ZukoToPyro`` flow, which ``MixtureSameFamily``
    cannot sample. Sampling draws one value from every component and keeps a uniformly
    chosen one (as ``MixtureSameFamily`` does), through the components' Pyro ``__call__``;
    it is not reparameterized. Pyro's plates and vectorized particles expand it with
    ``ExpandedDistribution``, whose ``log_prob`` relies on the same broadcasting.

    Diagonal Gaussian components of batch shape ``(K,)`` (a VampPrior over the
    ``diagonal_normal`` encoder) are scored without the ``(values, K, D)`` broadcast: the
    squared distances come from one matrix product, expanded as ``z^2 / s^2 - 2 z m / s^2 +
    m^2 / s^2`` and computed in double precision, where that expansion's cancellation costs
    about ``1e-16 (z / s)^2`` rather than ``1e-7 (z / s)^2`` in single precision.
    benchmarks/vamp_prior_speed.py measures what this saves training, importance sampling
    and AIS.

    With components of batch shape ``(K,)``, both go through at most
    :data:`MAX_COMPONENT_PAIRS` (value, component) pairs at a time (D times as many for
    diagonal Gaussian components, which hold one number per pair, not D), so that memory stays
    bounded however many values come at once: scoring 4,500 values against a VampPrior of
    100 flow (IAF) components took 2.3 GB in one call and 0.8 GB in chunks (655 values),
    and importance sampling such a run with K = 500 had grown past 12 GB.

    Args:
        components: a distribution with batch shape ``(..., K)``, K >= 1.
        validate_args: check the arguments (Pyro's default when None).

    Example:
        >>> components = dist.Normal(torch.zeros(3, 2), 1.0).to_event(1)
        >>> UniformMixture(components).log_prob(torch.zeros(5, 2)).shape
        torch.Size([5])
    """

    arg_constraints: dict = {}
    has_rsample = False

    def __init__(self, components: dist.Distribution, validate_args: bool | None = None) -> None:
        if not components.batch_shape:
            raise ValueError(
                "UniformMixture needs components with batch shape (..., K); got batch shape ()"
            )
        self.components = components
        super().__init__(components.batch_shape[:-1], components.event_shape, validate_args)

    @property
    def num_components(self) -> int:
        return self.components.batch_shape[-1]

    @constraints.dependent_property
    def support(self) -> constraints.Constraint:
        return self.components.support

    def log_prob(self, value: Tensor) -> Tensor:
        if _is_diagonal_normal(self.components):
            return self._diagonal_normal_log_prob(value)
        return self._broadcast_log_prob(value)

    def _broadcast_log_prob(self, value: Tensor) -> Tensor:
        """``log_prob`` for any components: the value broadcast against all K of them."""
        value = value.unsqueeze(-1 - len(self.event_shape))
        rows, shape = self._rows(), value.shape[: -1 - len(self.event_shape)]
        if rows is not None and shape.numel() > rows:
            flat = value.reshape(-1, 1, *self.event_shape)
            parts = [self.components.log_prob(part).logsumexp(-1) for part in flat.split(rows)]
            return torch.cat(parts).reshape(shape) - math.log(self.num_components)
        log_q = self.components.log_prob(value)
        return log_q.logsumexp(-1) - math.log(self.num_components)

    @torch.no_grad()
    def sample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> Tensor:
        sample_shape = torch.Size(sample_shape)
        rows = self._rows()
        if rows is not None and sample_shape.numel() > rows:
            draws = [self._sample(torch.Size([n])) for n in _sizes(sample_shape.numel(), rows)]
            return torch.cat(draws).reshape(sample_shape + self.event_shape)
        return self._sample(sample_shape)

    def _diagonal_normal_log_prob(self, value: Tensor) -> Tensor:
        """``log_prob`` for diagonal Gaussian components of batch shape ``(K,)``, by one matrix
        product per chunk rather than a ``(values, K, D)`` broadcast (see the class docs)."""
        dim = self.event_shape[0]
        if value.dim() < 1 or value.shape[-1] != dim:
            raise ValueError(
                f"UniformMixture.log_prob needs values of event shape ({dim},); got shape "
                f"{tuple(value.shape)}"
            )
        if self._validate_args:
            self.components._validate_sample(value.unsqueeze(-2))
        normal = self.components.base_dist
        shape = torch.broadcast_shapes(value.shape[:-1], self.batch_shape)
        flat = value.expand(shape + self.event_shape).reshape(-1, dim).double()
        loc, scale = normal.loc.double(), normal.scale.double()
        precision = scale.pow(-2)
        norm = (loc.square() * precision).sum(-1) + 2 * scale.log().sum(-1)
        norm = norm + dim * math.log(2 * math.pi)
        right = torch.cat([precision, -2 * loc * precision, norm[:, None]], -1)  # (K, 2D + 1)
        rows = max(1, MAX_COMPONENT_PAIRS * dim // self.num_components)
        parts = [_gaussian_mixture_log_prob(part, right) for part in flat.split(rows)]
        log_p = torch.cat(parts) - math.log(self.num_components)
        return log_p.to(torch.result_type(value, normal.loc)).reshape(shape)

    def _rows(self) -> int | None:
        """Values per chunk, for components of batch shape (K,); None: no chunks."""
        if len(self.components.batch_shape) != 1:
            return None
        return max(1, MAX_COMPONENT_PAIRS // self.num_components)

    def _sample(self, sample_shape: torch.Size) -> Tensor:
        shape = sample_shape + self.batch_shape
        draws = self.components(torch.Size(sample_shape))  # (*shape, K, *event_shape)
        index = torch.randint(self.num_components, shape, device=draws.device)
        index = index.reshape(shape + (1,) * (1 + len(self.event_shape)))
        index = index.expand(shape + (1,) + self.event_shape)
        return draws.gather(len(shape), index).squeeze(len(shape))


class VampPrior(nn.Module):
    """The VampPrior: the guide's encoder applied to K learned pseudo-inputs, mixed equally.

    ``p(z) = (1 / K) sum_k q(z | u_k)`` with pseudo-inputs ``u_k`` of shape
    ``(in_features,)``, initialised uniformly on [0, 1] (where image data live) and, by
    :meth:`initialize_from_data` (which ``fit`` calls before training), as K random training
    points, where the encoder already maps to codes of the data. The encoder
    is the guide's own module, shared: it is a submodule of both model and guide, so collect
    parameters with ``objective(model, guide).parameters()`` or
    ``nn.ModuleList([model, guide]).parameters()``, which list it once.

    Any encoder works, flows included: the prior is a :class:`UniformMixture` of the
    encoder's distribution for the K pseudo-inputs, which needs only batch shape ``(K,)``
    and a ``log_prob`` that broadcasts. Scoring B points costs one encoder ``log_prob``
    over B x K pairs. For a diagonal Gaussian encoder that is one matrix product
    (:class:`UniformMixture`); for a flow (IAF) encoder it is the flow's sequential
    direction, ``latent_dim`` passes per transform over the B x K pairs, or ``passes``
    (:class:`~pyrovae.guides.FlowEncoder`; 2 makes each transform a coupling layer). With configs/mnist-vamp-iaf.toml (K = 100, 50 dimensions, 3
    transforms) a training step of batch 100 took 10.5 s on one CPU thread fully
    autoregressive and 0.57 s with the config's coupling transforms, against 0.015 s for
    N(0, I) over the same guide.

    Args:
        latent_dim: dimension of z.
        in_features: number of data features F.
        encoder: the guide's encoder, ``encoder(x) -> Distribution`` over z.
        components: number of pseudo-inputs K (at least one).
        clip: clip the pseudo-inputs to [0, 1] before the encoder, as Tomczak and Welling's
            code does (``hardtanh(u, 0, 1)``), so that they stay where image data live; by
            default they are used as learned. An entry outside [0, 1] gets no gradient; one
            at exactly 0 or 1 does (``clamp``). PyTorch's ``hardtanh`` passes none there
            either, which would freeze for good the ~80% of entries that are 0 or 1 when the
            pseudo-inputs start as training digits (MNIST's background and full strokes).

    References:
        VAE with a VampPrior (Tomczak and Welling, 2018)
    """

    def __init__(
        self,
        latent_dim: int,
        in_features: int,
        encoder: nn.Module | None = None,
        components: int = 50,
        clip: bool = False,
    ) -> None:
        super().__init__()
        if encoder is None:
            raise ValueError("the VampPrior needs the guide's encoder (encoder is None)")
        _check_latent_dim(latent_dim)
        _check_components(components)
        if not isinstance(clip, bool):
            raise ValueError(f"clip must be true or false, got {clip!r}")
        self.encoder = encoder
        self.clip = clip
        self.pseudo_inputs = nn.Parameter(torch.rand(components, in_features))
        with torch.no_grad():
            self._check_components(latent_dim)

    def inputs(self) -> Tensor:
        """The pseudo-inputs as the encoder sees them: clipped to [0, 1] with ``clip``
        (``clamp``, whose gradient passes at the bounds)."""
        return self.pseudo_inputs.clamp(0.0, 1.0) if self.clip else self.pseudo_inputs

    def forward(self) -> dist.Distribution:
        return UniformMixture(self.encoder(self.inputs()))

    @torch.no_grad()
    def initialize_from_data(self, x: Tensor) -> None:
        """Sets the pseudo-inputs to K distinct random rows of ``x`` (with replacement when
        there are fewer rows than components)."""
        k = len(self.pseudo_inputs)
        rows = torch.randperm(len(x))[:k] if len(x) >= k else torch.randint(len(x), (k,))
        self.pseudo_inputs.copy_(x[rows.to(x.device)].reshape(self.pseudo_inputs.shape))

    def _check_components(self, latent_dim: int) -> None:
        components = self.encoder(self.inputs())
        shape = (tuple(components.batch_shape), tuple(components.event_shape))
        if shape != ((len(self.pseudo_inputs),), (latent_dim,)):
            raise ValueError(
                f"the VampPrior needs an encoder with batch shape (K,) and event shape "
                f"({latent_dim},) for K pseudo-inputs; got {shape}"
            )


class FlowPrior(nn.Module):
    """A normalizing-flow prior: a zuko MAF or NSF over z with a standard normal base.

    Sampling a MAF prior takes ``latent_dim`` sequential passes and scoring one pass; in a
    VAE the prior only scores the guide's samples during training, so this is the cheap
    direction where it matters.

    Args:
        latent_dim: dimension of z.
        flow: ``"maf"`` (affine) or ``"nsf"`` (rational-quadratic splines).
        transforms: number of autoregressive transforms (at least one).
        hidden: hidden layer sizes of each transform's masked MLP.
        passes: passes of the sampling direction per transform, None for ``latent_dim``
            (fully autoregressive); 2 makes each transform a coupling layer, cheap to sample.

    References:
        Variational Lossy Autoencoder (Chen et al., 2017);
        Masked Autoregressive Flow for Density Estimation (Papamakarios et al., 2017)
    """

    def __init__(
        self,
        latent_dim: int,
        flow: str = "maf",
        transforms: int = 3,
        hidden: Sequence[int] = (64, 64),
        passes: int | None = None,
    ) -> None:
        super().__init__()
        _check_latent_dim(latent_dim)
        self.flow = autoregressive_flow(flow, latent_dim, 0, transforms, hidden, passes=passes)

    def forward(self) -> dist.Distribution:
        return ZukoToPyro(self.flow())


def _check_latent_dim(latent_dim: int) -> None:
    if int(latent_dim) != latent_dim or latent_dim < 1:
        raise ValueError(f"latent_dim must be a positive integer, got {latent_dim}")


def _check_components(components: int) -> None:
    if int(components) != components or components < 1:
        raise ValueError(f"components must be a positive integer, got {components}")


PRIORS: dict[str, type[nn.Module]] = {
    "standard_normal": StandardNormal,
    "learned_normal": LearnedNormal,
    "label_normal": LabelNormal,
    "mixture": MixtureOfNormals,
    "vamp": VampPrior,
    "flow": FlowPrior,
}
"""Spec name -> prior constructor; the constructor's signature is the spec's schema."""
