"""The amortized guide q(z|x) as a Pyro program."""

from __future__ import annotations

from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor, nn

from pyrovae.model.distributions import as_pyro
from pyrovae.model.labelled import Labelled
from pyrovae.model.networks import network
from pyrovae.model.sites import DATA_PLATE, latent_sites


class AmortizedGuide(nn.Module):
    """The guide q(z|x): inside the data plate it draws ``z ~ encoder(x)``.

    With ``layers`` it is the bottom-up guide of a stacked model: ``z1 ~ encoder(x)``, then
    ``z_{l+1} ~ layers[l - 1](z_l)``, on the sites the model's stack uses.

    Args:
        encoder: ``encoder(x) -> Distribution`` over z with batch shape ``(B,)`` and event
            shape ``(latent_dim,)`` for ``x`` of shape ``(B, F)``.
        layers: conditionals ``q(z_{l+1} | z_l)``, bottom first.

    Example:
        >>> from pyrovae.guides import AmortizedGuide, DiagonalNormal
        >>> guide = AmortizedGuide(DiagonalNormal(in_features=5, latent_dim=2))
    """

    def __init__(self, encoder: nn.Module, layers: Sequence[nn.Module] = ()) -> None:
        super().__init__()
        self.encoder = encoder
        self.layers = nn.ModuleList(layers)
        self.latent_sites = latent_sites(len(self.layers) + 1)

    def forward(self, x: Tensor) -> Tensor:
        with pyro.plate(DATA_PLATE, x.shape[0]):
            first, *above = self.latent_sites
            z = bottom = pyro.sample(first, as_pyro(self.encoder(x)))
            for name, layer in zip(above, self.layers, strict=True):
                z = pyro.sample(name, as_pyro(layer(z)))
            return bottom


class ConditionalGuide(AmortizedGuide):
    """The guide q(z | x, y) of a conditional VAE: the encoder reads ``[x, one_hot(y)]``.

    Args:
        encoder: ``encoder(rows) -> Distribution`` over z for rows ``[x, one_hot(y)]`` of
            ``F + classes`` numbers.
        classes: the number of classes.
        layers: as for :class:`AmortizedGuide`.

    Example:
        >>> from pyrovae.guides import ConditionalGuide, DiagonalNormal
        >>> from pyrovae.model.labelled import Labelled
        >>> guide = ConditionalGuide(DiagonalNormal(in_features=5 + 3, latent_dim=2), 3)
        >>> guide(Labelled(torch.zeros(4, 5), torch.tensor([0, 1, 2, 0]))).shape
        torch.Size([4, 2])
    """

    def __init__(self, encoder: nn.Module, classes: int, layers: Sequence[nn.Module] = ()) -> None:
        super().__init__(encoder, layers)
        self.classes = int(classes)

    def forward(self, data: Labelled) -> Tensor:  # type: ignore[override]
        return super().forward(torch.cat([data.x, data.one_hot(self.classes)], -1))


class TopDownGuide(nn.Module):
    """The top-down guide of a stack whose every level reads x: ``z_L ~ encoder(x)``, then
    ``z_l ~ layers[l - 1]([x, z_{l+1}])`` down to z1 (Tomczak and Welling's q(z2|x) q(z1|x, z2)).

    The encoder gives q of the top latent in closed form, so a VampPrior on the top latent
    can use it.

    Args:
        encoder: ``encoder(x) -> Distribution`` over the top latent z_L, batch shape ``(B,)``.
        layers: conditionals ``q(z_l | x, z_{l+1})``, bottom first: ``layers[0]`` reads
            ``[x, z2]`` (``F + dim(z2)`` numbers) and gives the distribution of z1.

    References:
        VAE with a VampPrior (Tomczak and Welling, 2018), section 3.2

    Example:
        >>> from pyrovae.guides import DiagonalNormal, TopDownGuide
        >>> from pyrovae.model import ConditionalNormal
        >>> guide = TopDownGuide(DiagonalNormal(5, 2), [ConditionalNormal(5 + 2, 3)])
        >>> guide(torch.zeros(4, 5)).shape
        torch.Size([4, 3])
    """

    def __init__(self, encoder: nn.Module, layers: Sequence[nn.Module]) -> None:
        super().__init__()
        if not layers:
            raise ValueError("a top-down guide needs at least one layer below the encoder's")
        self.encoder = encoder
        self.layers = nn.ModuleList(layers)
        self.latent_sites = latent_sites(len(self.layers) + 1)

    def forward(self, x: Tensor) -> Tensor:
        with pyro.plate(DATA_PLATE, x.shape[0]):
            *below, top = self.latent_sites
            z = pyro.sample(top, as_pyro(self.encoder(x)))
            for name, layer in zip(reversed(below), reversed(self.layers), strict=True):
                shape = torch.broadcast_shapes(x.shape[:-1], z.shape[:-1])
                both = torch.cat([x.expand(*shape, -1), z.to(x).expand(*shape, -1)], -1)
                z = pyro.sample(name, as_pyro(layer(both)))
            return z


class Classifier(nn.Module):
    """q(y|x): a ``OneHotCategorical`` over ``classes`` from an MLP of x.

    Args:
        in_features: number of data features F.
        classes: number of classes.
        hidden: hidden layer sizes.
        activation: activation between layers.
    """

    def __init__(
        self,
        in_features: int,
        classes: int,
        hidden: Sequence[int] = (500,),
        activation: str = "relu",
    ) -> None:
        super().__init__()
        self.net = network("mlp", in_features, classes, hidden, activation)

    def forward(self, x: Tensor) -> dist.OneHotCategorical:
        return dist.OneHotCategorical(logits=self.net(x))


class SemiSupervisedGuide(nn.Module):
    """The M2 guide: q(y|x) q(z|x, y), with y enumerated in parallel on unlabelled rows.

    It reads a :class:`~pyrovae.model.labelled.Labelled` batch (or a tensor ``x``, all rows
    unlabelled). On labelled rows it draws ``z_labelled ~ encoder([x, one_hot(y)])``; on the
    others ``y ~ classifier(x)``, marked for parallel enumeration (summed out
    exactly by ``TraceEnum_ELBO``, drawn when scored by importance sampling), then
    ``z ~ encoder([x, y])``.

    Args:
        encoder: ``encoder(rows) -> Distribution`` over z, reading ``[x, one_hot(y)]``.
        classifier: ``classifier(x) -> OneHotCategorical``, q(y|x).
        classes: the number of classes.
    """

    def __init__(self, encoder: nn.Module, classifier: nn.Module, classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.classifier = classifier
        self.classes = int(classes)
        self.latent_sites = latent_sites(1)

    def forward(self, data: Labelled | Tensor) -> Tensor | None:
        data = data if isinstance(data, Labelled) else Labelled.unlabelled(data)
        x, known = data.x, data.known
        if known.any():
            rows = torch.cat([x[known], data[known].one_hot(self.classes)], -1)
            with pyro.plate("labelled", int(known.sum())):
                pyro.sample("z_labelled", as_pyro(self.encoder(rows)))
        if known.all():
            return None
        xu = x[~known]
        with pyro.plate(DATA_PLATE, len(xu)):
            y = pyro.sample("y", self.classifier(xu), infer={"enumerate": "parallel"})
            shape = torch.broadcast_shapes(y.shape[:-1], xu.shape[:-1])
            both = torch.cat([xu.expand(*shape, -1), y.to(xu).expand(*shape, -1)], -1)
            return pyro.sample("z", as_pyro(self.encoder(both)))
