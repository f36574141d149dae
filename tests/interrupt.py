"""A training callback that simulates a kill in the middle of an epoch."""

from __future__ import annotations

from torch import Tensor

from pyrovae.inference import Callback, FitState


class InterruptAt(Callback):
    """Raises ``KeyboardInterrupt`` after the first optimizer step of epoch ``epoch``, as a
    Ctrl-C there would: the parameters have moved, the epoch's checkpoint is not written."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_step_end(self, state: FitState, step: int, loss: Tensor) -> None:
        if state.epoch == self.epoch:
            raise KeyboardInterrupt
