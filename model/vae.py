"""The VAE as a Pyro model: a prior p(z), a decoder and a likelihood p(x|z)."""

from __future__ import annotations

from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor, nn

from pyrovae.model.distributions import as_pyro
from pyrovae.model.labelled import Labelled
from pyrovae.model.sites import DATA_PLATE, OBSERVED, latent_sites


class VAE(nn.Module):
    """The generative model p(x, z) = p(z) p(x|z) as a Pyro program.

    ``forward(x)`` is the model: inside a plate over the rows of ``x`` it draws
    ``z ~ prior()`` and observes ``x ~ likelihood(decoder(z))``. Any modules that fit the
    protocols below plug in; nothing checks their classes.

    With ``layers``, latents are stacked (Burda et al.'s two-layer model): the prior sits on
    the top latent, each layer draws the one below it, and the decoder reads the bottom one,
    ``z_L ~ prior(), z_l ~ layers[l - 1](z_{l+1}), x ~ likelihood(decoder(z_1))``, with the
    sites named by :func:`~pyrovae.model.sites.latent_sites` (``z1``, ``z2``, ...). With
    ``skip``, the decoder reads every latent, ``decoder([z_1, ..., z_L])`` (Tomczak and
    Welling's hierarchical VAE, p(x | z1, z2)).

    Args:
        prior: ``prior() -> Distribution`` with event shape ``(latent_dim,)``; a plain
            ``torch.distributions`` object is wrapped for Pyro.
        decoder: ``decoder(z) -> Tensor``, mapping ``(..., latent_dim)`` to likelihood
            parameters ``(..., F * num_params)``.
        likelihood: ``likelihood(params) -> Distribution`` with event shape ``(F,)``.
        layers: conditionals ``p(z_l | z_{l+1})``, bottom first: ``layers[0](z2)`` is the
            distribution of z1 (e.g. :class:`~pyrovae.model.layers.ConditionalNormal`).
        skip: the decoder reads the concatenation of all latents, bottom first, rather than
            the bottom one; its input size is then the sum of their sizes.

    References:
        VAE with a VampPrior (Tomczak and Welling, 2018), section 3.2 (``skip``)

    Example:
        >>> from pyrovae.model import VAE, StandardNormal, Gaussian
        >>> vae = VAE(StandardNormal(2), torch.nn.Linear(2, 5), Gaussian(scale=0.5))
        >>> vae.sample(3).shape
        torch.Size([3, 5])
    """

    def __init__(
        self,
        prior: nn.Module,
        decoder: nn.Module,
        likelihood: nn.Module,
        layers: Sequence[nn.Module] = (),
        skip: bool = False,
    ) -> None:
        super().__init__()
        self.prior = prior
        self.decoder = decoder
        self.likelihood = likelihood
        self.layers = nn.ModuleList(layers)
        self.latent_sites = latent_sites(len(self.layers) + 1)
        self.skip = bool(skip)

    @property
    def decoder_sites(self) -> tuple[str, ...]:
        """The latent sites the decoder reads, in the order of its input: the bottom one, or
        every one with ``skip``."""
        return self.latent_sites if self.skip else self.latent_sites[:1]

    def decode(self, z: Tensor) -> dist.Distribution:
        """The likelihood p(x|z) for the decoder's input ``z``: the bottom latent, shape
        ``(..., latent_dim)``, or with ``skip`` all latents concatenated, bottom first."""
        return as_pyro(self.likelihood(self.decoder(z)))

    def forward(self, x: Tensor) -> Tensor:
        with pyro.plate(DATA_PLATE, x.shape[0]):
            z = self._latents()
            pyro.sample(OBSERVED, self.decode(z), obs=x)
        return z

    def _latents(self, labels: Tensor | None = None) -> Tensor:
        """Draws the latents top-down inside the data plate; returns the decoder's input (the
        bottom one, or with ``skip`` all of them, bottom first). A prior that ``reads_labels``
        is given the rows' one-hot ``labels``."""
        *below, top = self.latent_sites
        reads = labels is not None and getattr(self.prior, "reads_labels", False)
        z = pyro.sample(top, as_pyro(self.prior(labels) if reads else self.prior()))
        drawn = [z]
        for name, layer in zip(reversed(below), reversed(self.layers), strict=True):
            z = pyro.sample(name, as_pyro(layer(z)))
            drawn.append(z)
        if not self.skip:
            return z
        shape = torch.broadcast_shapes(*(d.shape[:-1] for d in drawn))
        return torch.cat([d.expand(*shape, -1) for d in reversed(drawn)], -1)

    @torch.no_grad()
    def sample(self, num_samples: int, mean: bool = True) -> Tensor:
        """Generates data: z ~ p(z), then x ~ p(x|z).

        Args:
            num_samples: how many points to generate.
            mean: return the mean of p(x|z) (pixel probabilities for Bernoulli) rather
                than a draw from it.

        Returns:
            A tensor of shape ``(num_samples, F)``.
        """
        with pyro.plate(DATA_PLATE, num_samples):
            z = self._latents()
        px = self.decode(z)
        return px.mean if mean else px.sample()


class ConditionalVAE(VAE):
    """A conditional VAE (Sohn et al., 2015): a label y is observed context of both networks.

    The data are a :class:`~pyrovae.model.labelled.Labelled` batch: ``x`` and every row's
    label ``y``. The model draws z from the prior (which reads y only if it ``reads_labels``)
    and observes ``x ~ likelihood(decoder([z, one_hot(y)]))``; its guide reads both,
    q(z | x, y). ``log p(x)`` estimated for this model is log p(x | y).

    Args:
        prior, decoder, likelihood, layers: as for :class:`VAE`; the decoder takes
            ``latent_dim + classes`` inputs.
        classes: the number of classes, the size of the one-hot context.

    References:
        Learning Structured Output Representation using Deep Conditional Generative Models
        (Sohn, Lee and Yan, 2015)
    """

    def __init__(
        self,
        prior: nn.Module,
        decoder: nn.Module,
        likelihood: nn.Module,
        classes: int,
        layers: Sequence[nn.Module] = (),
    ) -> None:
        super().__init__(prior, decoder, likelihood, layers)
        if int(classes) != classes or classes < 2:
            raise ValueError(f"classes must be an integer of at least 2, got {classes}")
        self.classes = int(classes)

    def _like(self) -> Tensor:
        """An empty tensor of the model's dtype and device."""
        return next(iter(self.parameters()), torch.empty(0))[:0]

    def context_of(self, data: Labelled) -> Tensor:
        """The one-hot label of each row, what the decoder is given for it."""
        return data.one_hot(self.classes)

    def one_hot(self, labels: Tensor | int, num: int | None = None) -> Tensor:
        """The context of ``labels`` (an int is repeated ``num`` times), in the model's dtype."""
        labels = torch.as_tensor(labels, dtype=torch.long)
        if labels.dim() == 0:
            labels = labels.expand(1 if num is None else num)
        if ((labels < 0) | (labels >= self.classes)).any():
            raise ValueError(
                f"labels must lie in [0, {self.classes}), got {labels.unique().tolist()}"
            )
        like = self._like()
        code = torch.nn.functional.one_hot(labels.to(like.device), self.classes)
        return code.to(like.dtype)

    def decode(self, z: Tensor, context: Tensor) -> dist.Distribution:  # type: ignore[override]
        """p(x | z, y) for latents ``(..., latent_dim)`` and one-hot ``context (..., classes)``."""
        context = context.to(z).expand(*z.shape[:-1], self.classes)
        return super().decode(torch.cat([z, context], -1))

    def forward(self, data: Labelled) -> Tensor:  # type: ignore[override]
        x, context = data.x, data.one_hot(self.classes)
        with pyro.plate(DATA_PLATE, x.shape[0]):
            z = self._latents(context)
            pyro.sample(OBSERVED, self.decode(z, context), obs=x)
        return z

    @torch.no_grad()
    def sample(  # type: ignore[override]
        self, num_samples: int, mean: bool = True, labels: Tensor | int | None = None
    ) -> Tensor:
        """Generates data of given classes: ``labels`` (one int, or one per sample; default
        the classes in turn, ``0, 1, ..., 0, 1, ...``), z ~ p(z), then x ~ p(x | z, y)."""
        if labels is None:
            labels = torch.arange(num_samples) % self.classes
        context = self.one_hot(labels, num_samples)
        if len(context) != num_samples:
            raise ValueError(f"got {len(context)} labels for {num_samples} samples")
        with pyro.plate(DATA_PLATE, num_samples):
            z = self._latents(context)
        px = self.decode(z, context)
        return px.mean if mean else px.sample()


class SemiSupervisedVAE(ConditionalVAE):
    """M2 (Kingma et al., 2014): the label y is a latent discrete site, observed where known.

    The data are a :class:`~pyrovae.model.labelled.Labelled` batch (or a tensor ``x``, all
    rows unlabelled, as evaluation data are). Labelled rows go to the plate ``"labelled"`` (sites ``z_labelled``, ``y_labelled`` observed,
    ``x_labelled``) together with the classification term ``alpha * log q(y|x)`` as a factor;
    unlabelled rows to the data plate (sites ``y``, ``z``, ``x``), where the guide's y is
    enumerated by ``TraceEnum_ELBO`` (or sampled, when scored by importance sampling: log p(x)
    is then estimated over y and z jointly). Evaluation data carry no labels, so they are
    scored as any VAE's, on the data plate.

    Args:
        prior, decoder, likelihood: as for :class:`ConditionalVAE` (prior over z).
        classes: the number of classes.
        classifier: ``classifier(x) -> Distribution``, the guide's q(y|x) (a
            ``OneHotCategorical``), for the classification term: one module shared with
            the guide, a submodule of both.
        alpha: weight of log q(y|x) per labelled row (Kingma et al.: 0.1 N over all labelled
            points, about 50 per labelled point for 100 labels among 50,000).

    References:
        Semi-Supervised Learning with Deep Generative Models (Kingma, Rezende, Mohamed and
        Welling, 2014)
    """

    def __init__(
        self,
        prior: nn.Module,
        decoder: nn.Module,
        likelihood: nn.Module,
        classes: int,
        classifier: nn.Module,
        alpha: float = 50.0,
    ) -> None:
        super().__init__(prior, decoder, likelihood, classes)
        if not alpha >= 0:
            raise ValueError(f"alpha must be non-negative, got {alpha}")
        self.classifier = classifier
        self.alpha = float(alpha)

    def label_prior(self) -> dist.Distribution:
        """p(y): uniform over the classes."""
        like = self._like()
        probs = torch.full((self.classes,), 1 / self.classes, dtype=like.dtype, device=like.device)
        return dist.OneHotCategorical(probs=probs)

    def forward(self, data: Labelled | Tensor) -> Tensor | None:  # type: ignore[override]
        data = data if isinstance(data, Labelled) else Labelled.unlabelled(data)
        x, code, known = data.x, data.one_hot(self.classes), data.known
        if known.any():
            xl, yl = x[known], code[known]
            with pyro.plate("labelled", len(xl)):
                z = pyro.sample("z_labelled", as_pyro(self.prior()))
                pyro.sample("y_labelled", self.label_prior(), obs=yl)
                pyro.sample("x_labelled", self.decode(z, yl), obs=xl)
                pyro.factor("classification", self.alpha * self.classifier(xl).log_prob(yl))
        if known.all():
            return None
        xu = x[~known]
        with pyro.plate(DATA_PLATE, len(xu)):
            y = pyro.sample("y", self.label_prior())
            z = pyro.sample("z", as_pyro(self.prior()))
            pyro.sample(OBSERVED, self.decode(z, y), obs=xu)
        return z

    def context_of(self, data: Labelled | Tensor) -> Tensor:
        """The one-hot label of each row: its own where labelled, else q(y|x)'s most probable."""
        data = data if isinstance(data, Labelled) else Labelled.unlabelled(data)
        guess = self.one_hot(self.classifier(data.x).probs.argmax(-1))
        return torch.where(data.known.unsqueeze(-1), data.one_hot(self.classes), guess)
