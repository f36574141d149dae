"""The guide warm-up: a richer guide trains as its diagonal base for the first epochs."""

from __future__ import annotations

from typing import Any

from torch import nn

from pyrovae.inference.errors import PyrovaeError, check_int
from pyrovae.inference.experiment.callbacks import Callback, FitState

__all__ = ["GuideWarmup", "check_warmup", "set_base_only"]


class GuideWarmup(Callback):
    """Trains a richer guide as its diagonal Gaussian base for the first ``epochs`` epochs.

    Every submodule of the guide with a ``base_only`` switch (the full-covariance, low-rank
    and flow heads of ``pyrovae.guides``) gives its diagonal base while the switch is on: the
    same loc and scales, without the off-diagonal entries, the low-rank factor or the flow,
    whose parameters wait untouched (Adam skips a parameter without a gradient). The switch
    is set from the epoch number before every epoch, so a resumed run picks it up where it
    was, and is off again when training ends: the guide ``fit`` returns is the full one.
    Validation during the warm-up scores the base, the guide being trained.

    Why: against an N(0, I) prior the diagonal guide switches unneeded latent units off
    (their q is exactly the prior) and puts the information in the others. A full-covariance
    or flow guide trained from the first step spreads it over rotated directions instead and
    after 10 MNIST epochs is 2 to 4 nats below the diagonal guide; warmed up for 5 epochs it
    starts learning correlations from the diagonal guide's solution. With learned priors the
    warm-up gained 1.6 nats on one seed as well (README, prior x guide grid).

    Args:
        epochs: epochs of the warm-up, at least 1.
    """

    def __init__(self, epochs: int) -> None:
        self.epochs = check_int(epochs, "guide warm-up epochs", error=PyrovaeError)

    @property
    def warmup_epochs(self) -> int:  # early stopping and the best epoch count after it
        return self.epochs

    def on_fit_start(self, state: FitState) -> None:
        check_warmup(state.guide, self.epochs)

    def on_epoch_start(self, state: FitState) -> None:
        set_base_only(state.guide, state.epoch <= self.epochs)

    def on_fit_end(self, state: FitState) -> None:
        set_base_only(state.guide, False)


def check_warmup(guide: Any, epochs: int) -> None:
    """Refuses a guide warm-up that would change nothing: a guide without a richer head."""
    if epochs and not _switchable(guide):
        raise PyrovaeError(
            f"a guide warm-up of {epochs} epochs has nothing to hold back: the guide has no "
            "full-covariance, low-rank or flow head; use one of those encoders or drop the warm-up "
            "(train.guide_warmup = 0)"
        )


def set_base_only(guide: Any, on: bool) -> int:
    """Sets the ``base_only`` switch of every submodule of ``guide`` that has one; returns how
    many have one (0 for a diagonal guide, or a guide that is not an ``nn.Module``)."""
    heads = _switchable(guide)
    for head in heads:
        head.base_only = on
    return len(heads)


def _switchable(guide: Any) -> list[nn.Module]:
    """The submodules of ``guide`` with a ``base_only`` switch."""
    if not isinstance(guide, nn.Module):
        return []
    return [m for m in guide.modules() if hasattr(m, "base_only")]
