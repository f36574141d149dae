"""Training recipes from the spec: the optimizer (``train.optimizer``) and the learning-rate
schedule (``train.lr_schedule``), both torch's own.

As for every registry, the constructor's signature is the spec's schema; ``params``, ``lr``,
``optimizer`` and ``epochs`` are filled in by the builder. Schedules are stepped once per
epoch, after validation (``plateau`` watches the validation ELBO).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch.optim import Optimizer, lr_scheduler

from pyrovae.inference.errors import check_int


def adam(
    params: Iterable[torch.Tensor],
    lr: float,
    betas: Sequence[float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    amsgrad: bool = False,
    normalize_grad: bool = False,
    fused: bool | None = None,
) -> torch.optim.Adam:
    """``torch.optim.Adam``; ``eps = 1e-4`` is Burda et al.'s setting for VAEs.

    Args:
        normalize_grad: divide each parameter's gradient by its L2 norm (plus 1e-7) before
            every step, as the VampPrior paper's ``AdamNormGrad`` does.
        fused: torch's fused kernel (one pass over each parameter, the same update); None
            uses it where torch has it for the parameters (floating tensors on the CPU or a
            GPU). On 2 CPU cores it steps the MNIST VAE in 0.5 ms against 3.3 ms for the
            default multi-tensor kernel (benchmarks/train_overhead.py).

    References:
        VAE with a VampPrior (Tomczak and Welling, 2018), code: ``utils/optimizer.py``
    """
    _check_betas(betas)
    _check_nonnegative(eps=eps, weight_decay=weight_decay)
    if not isinstance(normalize_grad, bool):
        raise ValueError(f"normalize_grad must be true or false, got {normalize_grad!r}")
    params = list(params)
    optimizer = torch.optim.Adam(
        params,
        lr=lr,
        betas=tuple(betas),
        eps=eps,
        weight_decay=weight_decay,
        amsgrad=amsgrad,
        fused=_fused(params, fused),
    )
    if normalize_grad:
        optimizer.register_step_pre_hook(_normalize_gradients)
    return optimizer


@torch.no_grad()
def _normalize_gradients(optimizer: Optimizer, args: object, kwargs: object) -> None:
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                p.grad.div_(torch.linalg.vector_norm(p.grad) + 1e-7)


def adamw(
    params: Iterable[torch.Tensor],
    lr: float,
    betas: Sequence[float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    fused: bool | None = None,
) -> torch.optim.AdamW:
    """``torch.optim.AdamW``: Adam with decoupled weight decay; ``fused`` as for :func:`adam`."""
    _check_betas(betas)
    _check_nonnegative(eps=eps, weight_decay=weight_decay)
    params = list(params)
    return torch.optim.AdamW(
        params,
        lr=lr,
        betas=tuple(betas),
        eps=eps,
        weight_decay=weight_decay,
        fused=_fused(params, fused),
    )


_FUSED_DEVICES = ("cpu", "cuda")


def fused_supported(params: Iterable[torch.Tensor]) -> bool:
    """Whether torch's fused Adam kernels take these parameters: floating tensors, all on
    the CPU or all on one kind of GPU."""
    params = [p["params"] if isinstance(p, dict) else p for p in params]
    flat = [q for p in params for q in (p if isinstance(p, list | tuple) else [p])]
    kinds = {p.device.type for p in flat}
    return (
        bool(flat)
        and all(p.is_floating_point() for p in flat)
        and len(kinds) == 1
        and kinds <= set(_FUSED_DEVICES)
    )


def _fused(params: list[torch.Tensor], fused: bool | None) -> bool | None:
    if fused is None:
        return True if fused_supported(params) else None
    if not isinstance(fused, bool):
        raise ValueError(f"fused must be true, false or unset, got {fused!r}")
    return fused or None


OPTIMIZERS = {"adam": adam, "adamw": adamw}
"""Spec name -> optimizer constructor (``train.optimizer``)."""


def constant(optimizer: Optimizer, epochs: int) -> None:
    """The learning rate ``train.lr`` throughout: no scheduler."""
    return None


def step(
    optimizer: Optimizer, epochs: int, step_size: int = 10, gamma: float = 0.5
) -> lr_scheduler.StepLR:
    """Multiplies the learning rate by ``gamma`` every ``step_size`` epochs."""
    _check_positive_int(step_size=step_size)
    _check_factor(gamma=gamma)
    return lr_scheduler.StepLR(optimizer, step_size=step_size, gamma=gamma)


def burda(
    optimizer: Optimizer, epochs: int, base: int = 3, stages: int = 8
) -> lr_scheduler.LambdaLR:
    """Burda et al.'s schedule: stage i (i = 0, ..., stages - 1) lasts ``base ** i`` epochs
    at ``lr * 10 ** (-i / 7)``; 3,280 epochs in all for the defaults.

    References:
        Importance Weighted Autoencoders (Burda, Grosse and Salakhutdinov, 2016)
    """
    _check_positive_int(base=base, stages=stages)
    ends = [sum(base**j for j in range(i + 1)) for i in range(stages)]

    def factor(epoch: int) -> float:
        stage = next((i for i, end in enumerate(ends) if epoch < end), stages - 1)
        return 10 ** (-stage / 7)

    return lr_scheduler.LambdaLR(optimizer, factor)


def plateau(
    optimizer: Optimizer,
    epochs: int,
    factor: float = 0.5,
    patience: int = 3,
    min_lr: float = 1e-6,
) -> lr_scheduler.ReduceLROnPlateau:
    """Multiplies the learning rate by ``factor`` when the validation ELBO has not improved
    for ``patience`` epochs."""
    _check_factor(factor=factor)
    _check_positive_int(patience=patience)
    _check_nonnegative(min_lr=min_lr)
    return lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="max", factor=factor, patience=patience, min_lr=min_lr
    )


def cosine(
    optimizer: Optimizer, epochs: int, min_lr: float = 0.0
) -> lr_scheduler.CosineAnnealingLR:
    """Cosine annealing from ``train.lr`` to ``min_lr`` over ``train.epochs``.

    References:
        SGDR: Stochastic Gradient Descent with Warm Restarts (Loshchilov and Hutter, 2017)
    """
    _check_nonnegative(min_lr=min_lr)
    return lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs, eta_min=min_lr)


LR_SCHEDULES = {
    "constant": constant,
    "step": step,
    "burda": burda,
    "plateau": plateau,
    "cosine": cosine,
}
"""Spec name -> learning-rate schedule constructor (``train.lr_schedule``)."""


def step_schedule(scheduler: object, validation_elbo: float) -> None:
    """Steps a scheduler once per epoch: a plateau schedule on the validation ELBO (skipped
    when it is NaN, without validation data), any other on the epoch count."""
    if isinstance(scheduler, lr_scheduler.ReduceLROnPlateau):
        if math.isfinite(validation_elbo):
            scheduler.step(validation_elbo)
    elif scheduler is not None:
        scheduler.step()


def _check_betas(betas: Sequence[float]) -> None:
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ValueError(f"betas must be two numbers in [0, 1), got {list(betas)}")


def _check_nonnegative(**values: float) -> None:
    for name, value in values.items():
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def _check_factor(**values: float) -> None:
    for name, value in values.items():
        if not 0 < value < 1:
            raise ValueError(f"{name} must be in (0, 1), got {value!r}")


def _check_positive_int(**values: int) -> None:
    for name, value in values.items():
        check_int(value, name)
