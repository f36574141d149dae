"""KL schedules: how much the KL term counts at each optimizer step, as Pyro effect handlers.

A schedule's ``handler(step)`` is the handler that optimizer step ``step`` (counted from 0
over the whole run) runs the loss under. The handlers wrap the distribution of every latent
sample site, in model and guide, so that its log density keeps its value but contributes a
reweighted gradient. A loss under them is therefore still the true ELBO (or whatever bound
the objective computes) in value, which is what is logged, evaluated and early-stopped on,
while its gradient is that of the annealed objective; nothing is computed twice. Any
objective that scores sites by their ``log_prob``, or through ``kl_divergence`` of the guide
and prior sites (TraceMeanField_ELBO), works under them.

With ``beta`` weighting the KL, the gradient is that of ``E[log p(x|z)] - beta * KL`` for a
reparameterized guide (every guide in ``guides/``); a score-function gradient would not be
reweighted consistently. For an importance-weighted bound the gradient of each particle's
latent terms is weighted instead, with the particle weights of the true bound.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import Message
from pyro.poutine.util import site_is_subsample
from torch import Tensor
from torch.distributions import Independent, kl_divergence, register_kl

from pyrovae.inference.errors import PyrovaeError, check_int
from pyrovae.model.distributions import TorchToPyro


class KLSchedule(Protocol):
    """What :func:`inference.experiment.training.fit` needs of a schedule."""

    def handler(self, step: int) -> AbstractContextManager:
        """The handler optimizer step ``step`` runs the loss under."""
        ...


@dataclass(frozen=True)
class ConstantBeta:
    """The same KL weight at every step: 1 is the ELBO, above 1 the beta-VAE.

    Args:
        beta: weight of the KL term, at least 0.

    References:
        beta-VAE: Learning Basic Visual Concepts with a Constrained Variational Framework
        (Higgins et al., 2017)
    """

    beta: float = 1.0

    def __post_init__(self) -> None:
        _check_beta(self.beta, "beta")

    def __call__(self, step: int) -> float:
        """The KL weight at ``step``."""
        return self.beta

    def handler(self, step: int) -> AbstractContextManager:
        """``KLWeight(beta)``; no handler at all for ``beta = 1``."""
        return nullcontext() if self.beta == 1 else KLWeight(self.beta)


@dataclass(frozen=True)
class LinearWarmup:
    """A KL weight rising linearly from ``start`` at step 0 to ``beta`` at ``warmup_steps``.

    Args:
        warmup_steps: optimizer steps of the warm-up, at least 1.
        beta: the weight from ``warmup_steps`` on.
        start: the weight at step 0.

    References:
        Ladder Variational Autoencoders (Sønderby et al., 2016)
    """

    warmup_steps: int
    beta: float = 1.0
    start: float = 0.0

    def __post_init__(self) -> None:
        _check_steps(self.warmup_steps, "warmup_steps", 1)
        _check_beta(self.beta, "beta")
        _check_beta(self.start, "start")

    def __call__(self, step: int) -> float:
        """The KL weight at ``step``."""
        return self.start + (self.beta - self.start) * min(1.0, step / self.warmup_steps)

    def handler(self, step: int) -> AbstractContextManager:
        """``KLWeight`` with this step's weight."""
        return KLWeight(self(step))


@dataclass(frozen=True)
class CyclicalAnnealing:
    """A KL weight that repeatedly rises linearly from 0 and then holds.

    Each cycle of ``period`` steps spends its first ``ratio`` part rising from 0 to ``beta``
    and the rest at ``beta``: ``beta * min(1, (step % period) / (ratio * period))``.

    Args:
        period: steps per cycle, at least 2.
        ratio: the part of a cycle spent rising, in (0, 1].
        beta: the weight the cycle rises to.

    References:
        Cyclical Annealing Schedule: A Simple Approach to Mitigating KL Vanishing
        (Fu et al., 2019)
    """

    period: int
    ratio: float = 0.5
    beta: float = 1.0

    def __post_init__(self) -> None:
        _check_steps(self.period, "period", 2)
        if not 0 < self.ratio <= 1:
            raise ValueError(f"ratio must be in (0, 1], got {self.ratio}")
        _check_beta(self.beta, "beta")

    def __call__(self, step: int) -> float:
        """The KL weight at ``step``."""
        return self.beta * min(1.0, (step % self.period) / (self.ratio * self.period))

    def handler(self, step: int) -> AbstractContextManager:
        """``KLWeight`` with this step's weight."""
        return KLWeight(self(step))


class KLWeight(Messenger):
    """Weights the gradient of every latent site's log density by ``beta``, not its value.

    Under it, the loss of a Pyro ELBO keeps its value and gets the gradient of
    ``E[log p(x|z)] - beta * KL(q(z|x) || p(z))``: the latent sites of model and guide (the
    sites without ``obs``) are wrapped, the observed ones left alone. Unlike
    ``poutine.scale``, which scales values too, the objective it reports stays the true one.

    Args:
        beta: the KL weight, at least 0.

    Example:
        >>> import torch
        >>> from pyrovae.inference import elbo
        >>> from pyrovae.guides import AmortizedGuide, DiagonalNormal
        >>> from pyrovae.model import VAE, Gaussian, StandardNormal
        >>> vae = VAE(StandardNormal(2), torch.nn.Linear(2, 5), Gaussian(scale=0.5))
        >>> guide = AmortizedGuide(DiagonalNormal(5, 2))
        >>> x = torch.randn(4, 5)
        >>> _ = torch.manual_seed(0)
        >>> plain = elbo()(vae, guide)(x)
        >>> _ = torch.manual_seed(0)
        >>> with KLWeight(0.1):
        ...     weighted = elbo()(vae, guide)(x)
        >>> torch.allclose(plain, weighted)  # the weight scales the KL's gradient, not the loss
        True
    """

    def __init__(self, beta: float | Tensor) -> None:
        # A 0-dim tensor weight is an input of a traced step (``inference.algorithms.compiled``):
        # every latent site is then wrapped, and no Python branch reads its value.
        if not isinstance(beta, Tensor):
            _check_beta(beta, "beta")
            beta = float(beta)
        super().__init__()
        self.beta = beta

    def _pyro_sample(self, msg: Message) -> None:
        if _is_latent(msg) and (isinstance(self.beta, Tensor) or self.beta != 1):
            msg["fn"] = _Reweighted(msg["fn"], scale=self.beta)


class FreeBits(Messenger):
    """Free bits: no gradient pushes the KL of a latent dimension below ``lambda_`` nats.

    The gradient becomes that of ``E[log p(x|z)] - B * sum_d max(lambda_, KL_d)``, where
    ``KL_d`` is the closed-form KL of dimension d between guide and prior averaged over the
    batch of B points; the loss keeps its value. The guide draws z first (the site's
    proposal is remembered) and the model then scores it under the prior; both must be
    factorized over the latent dimensions (``Independent`` over one dimension, e.g.
    ``Normal(loc, scale).to_event(1)``) with a registered KL for their base distributions.
    The handler is the same at every step, so it is its own schedule.

    Args:
        lambda_: the floor per dimension, in nats, at least 0.

    Raises:
        PyrovaeError: (when a loss runs under it) a guide or prior that is not factorized.

    References:
        Improved Variational Inference with Inverse Autoregressive Flow (Kingma et al., 2016)
    """

    def __init__(self, lambda_: float) -> None:
        _check_beta(lambda_, "lambda_")
        super().__init__()
        self.lambda_ = float(lambda_)
        self._proposals: dict[str, Any] = {}

    def handler(self, step: int) -> FreeBits:
        """This handler, whatever the step."""
        return self

    def __enter__(self) -> FreeBits:
        self._proposals = {}
        return super().__enter__()

    def __exit__(self, *args: Any) -> None:
        # Proposals hold the step's autograd graph; let it go with the step.
        self._proposals = {}
        super().__exit__(*args)

    def _pyro_sample(self, msg: Message) -> None:
        if not _is_latent(msg):
            return
        name, fn = msg["name"], msg["fn"]
        if msg["value"] is None:
            self._proposals[name] = fn
            msg["fn"] = _Reweighted(fn, scale=0.0)
            return
        if name not in self._proposals:
            raise PyrovaeError(
                f"free bits: site {name!r} was scored before the guide drew it; run the loss "
                "(guide, then model replayed against it) under the handler"
            )
        kl = kl_per_dimension(self._proposals[name], fn, name)
        mean_kl = kl.mean(dim=tuple(range(kl.dim() - 1)))
        penalty = -mean_kl.clamp(min=self.lambda_).sum()
        msg["fn"] = _Reweighted(fn, scale=0.0, shift=penalty)


def kl_per_dimension(guide: Any, prior: Any, name: str = "z") -> Tensor:
    """``KL(guide || prior)`` per latent dimension, shape ``batch_shape + (latent_dim,)``.

    Args:
        guide: q, ``Independent`` over one dimension.
        prior: p, likewise.
        name: the site, for the error message.

    Raises:
        PyrovaeError: either is not factorized, or the base pair has no registered KL.
    """
    factorized = all(
        isinstance(d, Independent) and d.reinterpreted_batch_ndims == 1 for d in (guide, prior)
    )
    if factorized:
        try:
            return kl_divergence(guide.base_dist, prior.base_dist)
        except NotImplementedError:
            pass
    raise PyrovaeError(
        f"free bits needs a guide and prior factorized over the latent dimensions with a "
        f"closed-form KL (e.g. Normal(...).to_event(1)); site {name!r} has guide "
        f"{_describe(guide)} and prior {_describe(prior)}"
    )


class _Reweighted(TorchToPyro):
    """``base`` whose ``log_prob`` keeps its value, its gradient times ``scale``, plus the
    gradient of ``shift`` (a scalar whose value is not added)."""

    def __init__(self, base: Any, scale: float | Tensor, shift: Tensor | None = None) -> None:
        super().__init__(base)
        self.scale = scale
        self.shift = shift

    def expand(self, batch_shape: torch.Size, _instance: Any = None) -> _Reweighted:
        return _Reweighted(self.base_dist.expand(batch_shape), self.scale, self.shift)

    def __call__(self, *args: Any, **kwargs: Any) -> Tensor:
        # The base's own call: zuko flows cache the log density of what they draw there.
        return self.base_dist(*args, **kwargs)

    def log_prob(self, value: Tensor) -> Tensor:
        return _reweight(self.base_dist.log_prob(value), self.scale, self.shift)


@register_kl(_Reweighted, _Reweighted)
def _kl_reweighted(guide: _Reweighted, prior: _Reweighted) -> Tensor:
    if guide.scale is not prior.scale and (
        isinstance(guide.scale, Tensor)
        or isinstance(prior.scale, Tensor)
        or guide.scale != prior.scale
    ):
        raise NotImplementedError  # TraceMeanField_ELBO then falls back to log densities
    shift = _difference(guide.shift, prior.shift)
    return _reweight(kl_divergence(guide.base_dist, prior.base_dist), guide.scale, shift)


def _reweight(value: Tensor, scale: float | Tensor, shift: Tensor | None) -> Tensor:
    if isinstance(scale, Tensor):
        value = value.detach() + scale * (value - value.detach())
    elif scale == 0:
        value = value.detach()
    elif scale != 1:
        # The value exactly (plus scale * 0), the gradient times scale.
        value = value.detach() + scale * (value - value.detach())
    if shift is not None:
        value = value + (shift - shift.detach())
    return value


def _difference(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None or b is None:
        return a if b is None else -b
    return a - b


def _is_latent(msg: Message) -> bool:
    return not msg["is_observed"] and not site_is_subsample(msg)


def _describe(d: Any) -> str:
    if isinstance(d, Independent):
        return f"Independent({type(d.base_dist).__name__}, {d.reinterpreted_batch_ndims})"
    return type(d).__name__


def _check_beta(value: float, name: str) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def _check_steps(value: int, name: str, minimum: int) -> None:
    check_int(value, name, minimum)


SCHEDULES = {
    "constant": ConstantBeta,
    "linear": LinearWarmup,
    "cyclical": CyclicalAnnealing,
    "free_bits": FreeBits,
}
"""Spec name -> schedule constructor; the constructor's signature is the spec's schema."""
