"""Labelled data: the data x, the labels y and which rows are labelled, as separate tensors.

A conditional VAE reads every row's label; M2 reads the labels of the rows that have one. Both
take a :class:`Labelled` batch where a plain VAE takes a tensor. It behaves like the tensor
``x`` wherever the training loop and the estimators handle a batch without looking inside
(``len``, ``shape``, indexing by rows, ``split``, ``to``), so that they need not know about
labels; it is a pytree, so that traced programs take its tensors as inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor

__all__ = ["Labelled", "data_of"]


@dataclass(frozen=True, eq=False)
class Labelled:
    """A batch of ``N`` rows: data ``x (N, F)``, integer labels ``y (N,)`` and ``known (N,)``,
    True where the row's label is known (``y`` is ignored elsewhere; one bool, or None for
    True, stands for every row).

    Example:
        >>> batch = Labelled(torch.zeros(4, 3), torch.tensor([0, 2, 1, 0]))
        >>> batch[1:3].y.tolist(), len(batch), batch.shape
        ([2, 1], 4, torch.Size([4, 3]))
        >>> Labelled.unlabelled(torch.zeros(2, 3)).known.tolist()
        [False, False]
    """

    x: Tensor
    y: Tensor
    known: Tensor | None = None

    def __post_init__(self) -> None:
        y = torch.as_tensor(self.y, device=self.x.device).long()
        known = torch.ones(len(y), dtype=torch.bool, device=y.device)
        if self.known is not None:
            known = torch.as_tensor(self.known, device=y.device).bool()
            if known.dim() == 0:  # one value for every row
                known = known.expand(y.shape)
        if not (self.x.dim() >= 1 and y.shape == known.shape == self.x.shape[:1]):
            raise ValueError(
                f"x, y and known must have the same number of rows, got shapes "
                f"{tuple(self.x.shape)}, {tuple(y.shape)} and {tuple(known.shape)}"
            )
        object.__setattr__(self, "y", y)
        object.__setattr__(self, "known", known)

    @classmethod
    def unlabelled(cls, x: Tensor) -> Labelled:
        """Rows of ``x`` without labels."""
        return cls(x, torch.zeros(len(x), dtype=torch.long, device=x.device), False)

    # --- what the loop and the estimators use, as on the tensor x --------------------------
    def __len__(self) -> int:
        return len(self.x)

    @property
    def shape(self) -> torch.Size:
        """The shape of ``x``."""
        return self.x.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.x.dtype

    @property
    def device(self) -> torch.device:
        return self.x.device

    def __getitem__(self, rows: Any) -> Labelled:
        return Labelled(self.x[rows], self.y[rows], self.known[rows])

    def split(self, size: int) -> list[Labelled]:
        """Consecutive batches of ``size`` rows, as ``Tensor.split``."""
        parts = zip(self.x.split(size), self.y.split(size), self.known.split(size), strict=True)
        return [Labelled(*part) for part in parts]

    def to(self, *args: Any, **kwargs: Any) -> Labelled:
        """``x.to(...)``; the labels follow ``x`` to its device and keep their dtype."""
        x = self.x.to(*args, **kwargs)
        return Labelled(x, self.y.to(x.device), self.known.to(x.device))

    def dim(self) -> int:
        return self.x.dim()

    def is_floating_point(self) -> bool:
        return self.x.is_floating_point()

    def cpu(self) -> Labelled:
        return self.to("cpu")

    def map(self, fn: Callable[[Tensor], Tensor]) -> Labelled:
        """The batch with ``fn(x)`` for ``x`` (a transform of the data, such as binarization)."""
        return Labelled(fn(self.x), self.y, self.known)

    # --- what labelled models read ---------------------------------------------------------
    def one_hot(self, classes: int) -> Tensor:
        """``(N, classes)`` one-hot labels in ``x``'s dtype; rows without a label are zero.
        (Labels are checked against the classes when the data are loaded, not here.)"""
        y = self.y.masked_fill(~self.known, 0)
        code = torch.nn.functional.one_hot(y, classes).to(self.x.dtype)
        return code * self.known.unsqueeze(-1).to(code)


def data_of(batch: Tensor | Labelled) -> Tensor:
    """The tensor ``x`` of a batch: the batch itself, or a labelled batch's ``x``."""
    return batch.x if isinstance(batch, Labelled) else batch


def _flatten(batch: Labelled) -> tuple[list[Tensor], None]:
    return [batch.x, batch.y, batch.known], None


def _unflatten(children: list[Tensor], context: None) -> Labelled:
    return Labelled(*children)


pytree.register_pytree_node(
    Labelled,
    _flatten,
    _unflatten,
    serialized_type_name="pyrovae.model.labelled.Labelled",
)
