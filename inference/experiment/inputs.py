"""What :func:`~pyrovae.inference.experiment.training.fit` takes, checked before it trains:
the device, the data (as floating tensors of the model's dtype, within the likelihood's
support) and the optimizer's settings."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from pyrovae.inference.errors import PyrovaeError, check_int
from pyrovae.inference.experiment.data import check_data
from pyrovae.model.labelled import Labelled

__all__ = ["check_inputs", "resolve_device"]


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` (or None) is CUDA when present, else the CPU; anything else goes to torch."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise PyrovaeError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise PyrovaeError(
            f"device {device!r} asked for but CUDA is not available; use cpu or auto"
        )
    return resolved


def check_inputs(model: Any, train: Tensor, validation: Tensor | None = None) -> None:
    """Checks the data once, up front, against the model's likelihood where it declares a support.

    Raises:
        PyrovaeError: NaN or infinite values, a wrong shape, or values outside the support.
    """
    # A likelihood may declare the support of the data it scores (a torch constraint).
    support = getattr(getattr(model, "likelihood", None), "support", None)
    check_data(train, "training data", support)
    if validation is not None:
        check_data(validation, "validation data", support)


def check_settings(epochs: int, batch_size: int) -> None:
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        check_int(value, name, error=PyrovaeError)


def floating_dtype(*parts: Any) -> torch.dtype:
    """The dtype of the first floating-point parameter of the modules, else torch's default."""
    for part in parts:
        if isinstance(part, nn.Module):
            for p in part.parameters():
                if p.is_floating_point():
                    return p.dtype
    return torch.get_default_dtype()


def as_data(x: Tensor | np.ndarray | Labelled, what: str, dtype: torch.dtype) -> Tensor | Labelled:
    """Data as a floating tensor of the model's dtype (or a labelled batch of one); integer
    data are refused."""
    if isinstance(x, Labelled):
        return x.map(lambda data: as_data(data, what, dtype))
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, Tensor):
        raise PyrovaeError(f"{what} must be a torch.Tensor or NumPy array, got {type(x).__name__}")
    if not x.is_floating_point():
        raise PyrovaeError(
            f"{what} has integer dtype {x.dtype}; pass floats (e.g. x / 255.0 for 8-bit images)"
        )
    return x.to(dtype)


def place(x: Tensor | Labelled, device: torch.device) -> Tensor | Labelled:
    """The data on ``device`` when it fits in half the free memory there, else pinned on the host."""
    if device.type != "cuda":
        return x.to(device)
    if isinstance(x, Labelled):
        return Labelled(place(x.x, device), place(x.y, device), place(x.known, device))
    free, _ = torch.cuda.mem_get_info(device)
    if x.numel() * x.element_size() < free // 2:
        return x.to(device)
    return x.pin_memory()
