"""Training on draws: a density-ratio critic and a density fitted by maximum likelihood.

Both learn from draws of distributions rather than from data points, with fresh draws every
epoch and early stopping on a held-out figure; the reporting layer's questions about the
aggregate posterior (:func:`~pyrovae.inference.reporting.aggregate.aggregate_kl`,
:func:`~pyrovae.inference.reporting.prior_fit.fit_prior`) are built on them.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from pyrovae.model.distributions import as_pyro

__all__ = [
    "DensityRatioCritic",
    "donsker_varadhan",
    "fit_critic",
    "fit_density",
    "train_with_patience",
]


class DensityRatioCritic(nn.Module):
    """T(z): an MLP on z standardized by the reference draws' moments, and on its squares, so
    that the log ratio of two Gaussians, quadratic in z, is linear in the inputs.

    Args:
        draws: ``(M, D)`` draws of the reference distribution (the denominator), for the
            standardization.
        hidden: units of its two hidden layers.
    """

    def __init__(self, draws: Tensor, hidden: int) -> None:
        super().__init__()
        self.register_buffer("loc", draws.mean(0))
        self.register_buffer("scale", draws.std(0).clamp_min(1e-6))
        dim = draws.shape[-1]
        self.net = nn.Sequential(
            nn.Linear(2 * dim, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, 1),
        )

    def forward(self, z: Tensor) -> Tensor:
        parts = []
        for part in z.split(65536):
            u = (part - self.loc) / self.scale
            parts.append(self.net(torch.cat([u, u.square()], -1)).squeeze(-1))
        return torch.cat(parts)


def fit_critic(
    draws: Callable[[], tuple[Tensor, Tensor]],
    valid: tuple[Tensor, Tensor],
    hidden: int,
    epochs: int,
    patience: int,
    batch_size: int,
    lr: float,
) -> tuple[DensityRatioCritic, list[float]]:
    """Logistic regression of draws of q (label 1) against draws of p (label 0), fresh
    ``draws()`` each epoch, stopped by the Donsker-Varadhan bound on the validation draws
    ``valid = (q_draws, p_draws)``; at the optimum the critic's logit is log q - log p.

    Returns:
        The best critic, and the validation bound after each epoch.
    """
    critic = DensityRatioCritic(valid[1], hidden).to(valid[1].device, valid[1].dtype)
    optimizer = torch.optim.Adam(critic.parameters(), lr=lr)

    def train_epoch() -> None:
        q_train, p_train = draws()
        order = torch.randperm(len(q_train), device=q_train.device)
        for index in order.split(batch_size):
            q_logit, p_logit = critic(q_train[index]), critic(p_train[index])
            loss = F.softplus(-q_logit).mean() + F.softplus(p_logit).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    def validate() -> float:
        with torch.no_grad():
            return donsker_varadhan(critic(valid[0]), critic(valid[1]))[0]

    return critic, train_with_patience(critic, train_epoch, validate, epochs, patience)


def donsker_varadhan(t_q: Tensor, t_p: Tensor) -> tuple[float, float]:
    """``E_q[T] - log E_p[exp T]`` from critic values on draws of q and of p, a lower bound
    on KL(q || p) for any T, and its standard error by the delta method.

    References:
        Asymptotic evaluation of certain Markov process expectations for large time
        (Donsker and Varadhan, 1983)
    """
    t_q, t_p = t_q.double(), t_p.double()
    log_mean_exp = torch.logsumexp(t_p, 0) - math.log(len(t_p))
    weights = (t_p - t_p.max()).exp()
    variance = t_q.var() / len(t_q) + weights.var() / (weights.mean().square() * len(t_p))
    return (t_q.mean() - log_mean_exp).item(), variance.sqrt().item()


def fit_density(
    density: nn.Module,
    params: Sequence[Tensor],
    draws: Callable[[], Tensor],
    validate: Callable[[], float],
    epochs: int,
    patience: int,
    batch_size: int,
    lr: float,
) -> list[float]:
    """Fits ``density()`` (a module returning a distribution, such as a prior) to draws by
    maximum likelihood: Adam on ``params``, fresh ``draws()`` each epoch, stopped by
    ``validate()`` (higher is better), leaving ``density`` in its best state.

    Returns:
        The validation figure after each epoch.
    """
    optimizer = torch.optim.Adam(params, lr=lr)

    def train_epoch() -> None:
        z = draws()
        for index in torch.randperm(len(z), device=z.device).split(batch_size):
            loss = -as_pyro(density()).log_prob(z[index]).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    return train_with_patience(density, train_epoch, validate, epochs, patience)


def train_with_patience(
    module: nn.Module,
    train_epoch: Callable[[], None],
    validate: Callable[[], float],
    epochs: int,
    patience: int,
) -> list[float]:
    """Runs ``train_epoch()`` then ``validate()`` (higher is better) for at most ``epochs``
    epochs, stops after ``patience`` epochs without a better figure, and leaves ``module``
    in its best state; returns the validation figure after each epoch."""
    history: list[float] = []
    best, best_state, waited = -math.inf, copy.deepcopy(module.state_dict()), 0
    for _ in range(epochs):
        train_epoch()
        history.append(validate())
        if history[-1] > best:
            best, best_state, waited = history[-1], copy.deepcopy(module.state_dict()), 0
        else:
            waited += 1
            if waited >= patience:
                break
    module.load_state_dict(best_state)
    return history
