"""The training loop: ``objective(model, guide)`` minimised with a plain ``torch.optim`` optimizer.

:func:`fit` is the loop and nothing else; checkpoints, early stopping, the progress bar and
logging are callbacks (:mod:`pyrovae.inference.experiment.callbacks`).
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pyro
import torch
from pyro import poutine
from torch import Tensor, nn

from pyrovae.inference.algorithms.compiled import CompiledStep, NotCompilable, compile_wanted
from pyrovae.inference.algorithms.objectives import elbo
from pyrovae.inference.algorithms.schedules import KLSchedule
from pyrovae.inference.errors import PyrovaeError
from pyrovae.inference.experiment.callbacks import (
    Callback,
    Checkpointing,
    EarlyStopping,
    FitState,
    device_of,
)
from pyrovae.inference.experiment.distributed import (
    all_reduce_sum,
    derived_seed,
    rank_and_world,
    shared_seed,
)
from pyrovae.inference.experiment.inputs import (
    as_data,
    check_inputs,
    check_settings,
    floating_dtype,
    place,
)
from pyrovae.inference.experiment.recipes import adam, step_schedule
from pyrovae.inference.experiment.validation import monitored, validate
from pyrovae.inference.experiment.warmup import GuideWarmup
from pyrovae.model.labelled import Labelled, data_of

__all__ = ["TrainingDiverged", "fit"]


class TrainingDiverged(PyrovaeError):
    """The loss became NaN or infinite; the run keeps its last good checkpoint."""


def fit(
    model: Callable[..., Any],
    guide: Callable[..., Any],
    train: Tensor | np.ndarray | Labelled,
    *,
    validation: Tensor | np.ndarray | Labelled | None = None,
    objective: Any = None,
    kl_schedule: KLSchedule | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    lr_scheduler: Any = None,
    epochs: int = 10,
    batch_size: int = 128,
    callbacks: Sequence[Callback] = (),
    compile: str | bool = "auto",
) -> list[dict[str, float]]:
    """Trains ``model`` and ``guide`` by minimising ``objective(model, guide)``.

    As in PyTorch, the modules' device is the training device (``vae.cuda()`` before ``fit``
    trains on the GPU); the whole training set is kept there when it fits. Each epoch shuffles
    it with the global torch RNG, so a run seeded beforehand (``pyro.set_rng_seed``) is
    reproducible on the CPU. The loss is the negative
    objective averaged over the batch. After every epoch the validation data are scored
    (ELBO, reconstruction and KL per point, from one draw) and the callbacks run. Everything
    else is a callback: :class:`~pyrovae.inference.experiment.callbacks.Checkpointing`,
    :class:`~pyrovae.inference.experiment.callbacks.EarlyStopping`,
    :class:`~pyrovae.inference.experiment.warmup.GuideWarmup`,
    :class:`~pyrovae.inference.experiment.callbacks.ProgressBar`,
    :class:`~pyrovae.inference.experiment.callbacks.GradientClipping`,
    :class:`~pyrovae.inference.experiment.callbacks.BatchTransform` (dynamic binarization).

    Args:
        model: the Pyro model: an ``nn.Module`` whose ``forward(x)`` observes ``x``, or a
            plain function whose parameters are ``pyro.param`` / ``pyro.module`` sites.
        guide: the Pyro guide, taking the same ``x``; a module or a function likewise.
        train: training data ``(N, F)``, a tensor or a NumPy array, or a
            :class:`~pyrovae.model.labelled.Labelled` batch (x, y and which rows are
            labelled) for a labelled model.
        validation: validation data, scored after every epoch.
        objective: a Pyro ELBO (``objective(model, guide)`` is the loss module);
            default ``pyrovae.inference.elbo()``.
        kl_schedule: a KL schedule (``pyrovae.inference.algorithms.schedules``): optimizer
            step ``s`` of the run, counted over all epochs (so a resumed run picks it up where
            it was), computes the loss under ``kl_schedule.handler(s)``. Those handlers change
            gradients only: the logged and evaluated ELBO stays the true one. Its warm-up
            (``warmup_steps``) is one of the run's warm-ups (``FitState.warmup_epochs``).
        optimizer: a ``torch.optim`` optimizer over the loss module's parameters; default
            Adam with learning rate 1e-3 and torch's fused kernel where it has one
            (:func:`~pyrovae.inference.experiment.recipes.adam`).
        lr_scheduler: a ``torch.optim.lr_scheduler`` scheduler of that optimizer, stepped
            after every epoch's validation (``ReduceLROnPlateau`` on the validation ELBO);
            checkpointed with the run.
        epochs: total number of epochs, counting those a restored run already has.
        batch_size: points per step.
        callbacks: :class:`Callback` objects, called in order.
        compile: ``"auto"``, ``"on"`` or ``"off"`` (or a bool): run the training step as a
            traced tensor program (:class:`~pyrovae.inference.algorithms.compiled.CompiledStep`:
            the same loss and gradients without Pyro's per-step Python, fused by
            ``torch.compile``). ``"auto"`` compiles fits of at least
            :data:`~pyrovae.inference.algorithms.compiled.AUTO_MIN_STEPS` steps on one
            process. A step that cannot be compiled trains eagerly, with one line saying why.

    Submodules with an ``initialize_from_data(x)`` method are first given the training data
    (a VampPrior's pseudo-inputs start as training points); a restored run then overwrites
    them, and the RNG states, with its checkpoint's.

    Returns:
        The history: one dict per epoch with ``epoch``, ``train_elbo``,
        ``validation_elbo``, ``validation_reconstruction``, ``validation_kl``,
        ``validation_active_units`` (NaN without validation data), ``lr`` (the epoch's
        learning rate), ``seconds`` (training only) and ``images_per_s``.

    Raises:
        TrainingDiverged: the loss became NaN or infinite.
        PyrovaeError: bad data or settings, found before any training.

    Example:
        >>> import torch
        >>> from pyrovae.guides import AmortizedGuide, DiagonalNormal
        >>> from pyrovae.model import VAE, Gaussian, StandardNormal
        >>> vae = VAE(StandardNormal(2), torch.nn.Linear(2, 5), Gaussian(scale=0.5))
        >>> guide = AmortizedGuide(DiagonalNormal(5, 2))
        >>> x_train, x_val = torch.randn(64, 5), torch.randn(16, 5)
        >>> history = fit(vae, guide, x_train, validation=x_val, epochs=2, batch_size=16)
        >>> len(history), "validation_elbo" in history[-1]
        (2, True)
    """
    check_settings(epochs, batch_size)
    # Where the modules' parameters are (the model's first); the CPU for plain functions.
    device = device_of(nn.ModuleList([p for p in (model, guide) if isinstance(p, nn.Module)]))
    dtype = floating_dtype(model, guide)
    x_train = as_data(train, "training data", dtype)
    x_val = as_data(validation, "validation data", dtype) if validation is not None else None
    check_inputs(model, x_train, x_val)
    callbacks = list(callbacks)
    if x_val is None and any(
        isinstance(c, EarlyStopping) and c.monitor.startswith("validation") for c in callbacks
    ):
        raise PyrovaeError("early stopping on a validation figure needs validation=... data")

    x_train = place(x_train, device)
    x_val = place(x_val, device) if x_val is not None else None
    _initialize_from_data(model, guide, x_train)
    loss_fn = (objective or elbo())(model, guide)
    params = _parameters(loss_fn, x_train[:batch_size].to(device))
    optimizer = optimizer or adam(params, 1e-3)
    steps = math.ceil(x_train.shape[0] / batch_size)
    rank, world = rank_and_world()
    state = FitState(
        model,
        guide,
        loss_fn,
        optimizer,
        epochs,
        steps,
        batch_size,
        lr_scheduler,
        rank=rank,
        world_size=world,
        warmup_epochs=max(
            [math.ceil(getattr(kl_schedule, "warmup_steps", 0) / steps)]
            + [callback.warmup_epochs for callback in callbacks]
        ),
    )
    train_module = loss_fn
    seed = 0
    if world > 1:
        # A guide warm-up leaves the richer part of the guide without gradients at first.
        warmup = any(isinstance(c, GuideWarmup) for c in callbacks)
        train_module = _data_parallel(loss_fn, model, guide, device, batch_size, world, warmup)
        # Every rank starts from rank 0's parameters (DDP broadcasts them) and draws from
        # its own stream, derived from the seed rank 0 was given; the shuffle is shared.
        seed = shared_seed(device)
        pyro.set_rng_seed(derived_seed(seed, rank))

    # The data were checked once above; per-step argument checks would only cost time.
    # Pyro warns of a NaN loss on every step and every gradient; a NaN stops training with
    # one error line (TrainingDiverged) instead.
    with pyro.validation_enabled(False), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Encountered NaN", category=UserWarning)
        try:
            for callback in callbacks:
                callback.on_fit_start(state)
            remaining = max(0, epochs - len(state.history)) * steps
            compiled = _compiled_step(compile, remaining, world, loss_fn, params, kl_schedule)
            while len(state.history) < epochs and not state.stop:
                state.epoch = len(state.history) + 1
                for callback in callbacks:
                    callback.on_epoch_start(state)
                seconds, train_elbo = _train_epoch(
                    state,
                    train_module,
                    callbacks,
                    params,
                    x_train,
                    kl_schedule,
                    seed,
                    compiled,
                )
                if not math.isfinite(train_elbo):
                    raise TrainingDiverged(_diverged(state.epoch, callbacks))
                validation = validate(loss_fn, x_val, batch_size, device)
                state.history.append(
                    {
                        "epoch": state.epoch,
                        "train_elbo": train_elbo,
                        **validation,
                        "lr": optimizer.param_groups[0]["lr"],
                        "seconds": seconds,
                        "images_per_s": len(x_train) / seconds,
                    }
                )
                step_schedule(lr_scheduler, validation[monitored(loss_fn)])
                for callback in callbacks:
                    callback.on_epoch_end(state)
        finally:
            for callback in callbacks:
                callback.on_fit_end(state)
    return state.history


def _compiled_step(
    mode: str | bool,
    steps: int,
    world: int,
    loss_fn: nn.Module,
    params: list[Tensor],
    kl_schedule: KLSchedule | None,
) -> CompiledStep | None:
    """The traced training step when ``mode`` asks for one and it can be built, else None."""
    if not compile_wanted(mode, steps):
        return None
    if world > 1:
        if mode in ("on", True):
            print("pyrovae: the training step runs eagerly on several processes", file=sys.stderr)
        return None
    try:
        return CompiledStep(loss_fn, params, kl_schedule)
    except NotCompilable as err:
        print(f"pyrovae: the training step runs eagerly: {err}", file=sys.stderr)
        return None


def _initialize_from_data(model: Any, guide: Any, x: Tensor | Labelled) -> None:
    """Lets every submodule with an ``initialize_from_data(x)`` method start from the
    training data (a VampPrior's pseudo-inputs, a learned likelihood scale). A restored run
    then overwrites these values with its checkpoint's."""
    seen: set[int] = set()
    x = data_of(x)  # a labelled batch's data
    for part in (model, guide):
        if not isinstance(part, nn.Module):
            continue
        for module in part.modules():
            hook = getattr(module, "initialize_from_data", None)
            if hook is not None and id(module) not in seen:
                seen.add(id(module))
                hook(x)


def _parameters(loss_fn: nn.Module, x: Tensor) -> list[Tensor]:
    """The loss module's parameters, and those of ``pyro.param`` / ``pyro.module`` sites of
    plain-function programs, captured from one traced evaluation of the loss as Pyro's
    ``SVI`` does."""
    params = list(loss_fn.parameters())
    if isinstance(loss_fn.model, nn.Module) and isinstance(loss_fn.guide, nn.Module):
        return params
    with torch.no_grad(), poutine.trace(param_only=True) as capture:
        loss_fn(x)
    seen = {id(p) for p in params}
    for site in capture.trace.nodes.values():
        unconstrained = site["value"].unconstrained()
        if id(unconstrained) not in seen:
            seen.add(id(unconstrained))
            params.append(unconstrained)
    return params


def _data_parallel(
    loss_fn: nn.Module,
    model: Any,
    guide: Any,
    device: torch.device,
    batch_size: int,
    world: int,
    unused: bool = False,
) -> nn.Module:
    """The loss module in ``DistributedDataParallel``, as Pyro's Lightning example wraps it;
    ``unused``: some parameters may get no gradient in a step (DDP must look for them)."""
    if not (isinstance(model, nn.Module) and isinstance(guide, nn.Module)):
        raise PyrovaeError("training on several processes needs model and guide as nn.Modules")
    if batch_size < world:
        raise PyrovaeError(
            f"batch_size {batch_size} is the global batch and must be at least the number of "
            f"processes, {world}"
        )
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(
        loss_fn, device_ids=device_ids, find_unused_parameters=unused
    )


def _train_epoch(
    state: FitState,
    train_module: nn.Module,
    callbacks: list[Callback],
    params: list[Tensor],
    x_train: Tensor,
    kl_schedule: KLSchedule | None,
    seed: int,
    compiled: CompiledStep | None = None,
) -> tuple[float, float]:
    optimizer, batch_size = state.optimizer, state.batch_size
    rank, world = state.rank, state.world_size
    train_module.train()
    n = x_train.shape[0]
    device = device_of(state.loss_fn, x_train.device)
    if world == 1:
        order = torch.randperm(n, device=x_train.device)
    else:
        # One permutation for all ranks, from the seed and the epoch; each rank takes a
        # disjoint slice of every global batch. A last batch too small to give every rank
        # a point is left out of this epoch (every rank must take the same steps).
        shuffle = torch.Generator().manual_seed(seed * 100_003 + state.epoch)
        order = torch.randperm(n, generator=shuffle).to(x_train.device)
        if 0 < n % batch_size < world:
            n -= n % batch_size
    first_step = (state.epoch - 1) * state.steps_per_epoch
    total = torch.zeros((), device=device)
    start_time = time.perf_counter()
    for step, start in enumerate(range(0, n, batch_size)):
        rows = order[start : min(start + batch_size, n)]
        x = x_train[rows[rank::world]].to(device, non_blocking=True)
        for callback in callbacks:
            x = callback.transform_batch(state, x)
        optimizer.zero_grad(set_to_none=True)
        if compiled is not None:
            loss, grads = compiled(x, first_step + step)
            for param, grad in zip(params, grads, strict=True):
                param.grad = grad
        else:
            if kl_schedule is None:
                loss = train_module(x)
            else:
                with kl_schedule.handler(first_step + step):
                    loss = train_module(x)
            (loss / x.shape[0]).backward()
        for callback in callbacks:
            callback.on_before_optimizer_step(state)
        optimizer.step()
        loss = loss.detach()
        total += loss
        for callback in callbacks:
            callback.on_step_end(state, step, loss)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start_time
    return seconds, -all_reduce_sum(total).item() / n


def _diverged(epoch: int, callbacks: list[Callback]) -> str:
    kept = ""
    for callback in callbacks:
        if isinstance(callback, Checkpointing):
            kept = (
                f"; the checkpoint of epoch {callback.latest.epoch} is kept in {callback.run_dir}"
                if callback.latest is not None
                else f"; no epoch finished, so {callback.run_dir} holds no checkpoint"
            )
    return (
        f"the loss became NaN or infinite in epoch {epoch}{kept}; lower train.lr or set "
        "train.grad_clip"
    )
