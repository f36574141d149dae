"""The training loop: ``objective(model, guide)`` minimised with a plain ``torch.optim`` optimizer.

:func:`fit` is the loop and nothing else; what happens around it (checkpoints, early stopping,
the progress bar, logging) is a :class:`Callback`, in the manner of Lightning's
``Callback.on_train_epoch_end``: each hook gets the :class:`FitState` and may read or change
it (``state.stop = True`` ends training after the epoch).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch
from pyro import poutine
from pyrovae.inference.algorithms.marginal import log_marginal_likelihood
from pyrovae.inference.algorithms.objectives import elbo
from pyrovae.inference.algorithms.schedules import KLSchedule
from pyrovae.inference.errors import PyrovaeError
from pyrovae.inference.experiment.data import check_data
from pyrovae.inference.experiment.runs import Checkpoint
from torch import Tensor, nn
from tqdm.auto import tqdm

__all__ = [
    "Callback",
    "Checkpointing",
    "EarlyStopping",
    "FitState",
    "ProgressBar",
    "TrainingDiverged",
    "check_inputs",
    "fit",
    "resolve_device",
]


class TrainingDiverged(PyrovaeError):
    """The loss became NaN or infinite; the run keeps its last good checkpoint."""


@dataclass
class FitState:
    """What the callbacks of :func:`fit` see and may change.

    Attributes:
        model, guide: the programs being trained.
        loss_fn: ``objective(model, guide)``, the loss module.
        optimizer: the optimizer.
        epochs: the total number of epochs asked for.
        steps_per_epoch: optimizer steps in one epoch.
        batch_size: points per step.
        history: one dict per finished epoch; a callback restoring a run fills it in
            :meth:`Callback.on_fit_start`, and the loop continues after its last epoch.
        epoch: the epoch running or last finished (0 before the first).
        stop: set by a callback to end training after the current epoch.
    """

    model: Any
    guide: Any
    loss_fn: nn.Module
    optimizer: torch.optim.Optimizer
    epochs: int
    steps_per_epoch: int
    batch_size: int
    history: list[dict[str, float]] = field(default_factory=list)
    epoch: int = 0
    stop: bool = False


class Callback:
    """Hooks of the training loop; subclass and override the ones you need."""

    def on_fit_start(self, state: FitState) -> None:
        """Before the first epoch (after seeding): restore state, open files or bars."""

    def on_step_end(self, state: FitState, step: int, loss: Tensor) -> None:
        """After optimizer step ``step`` of the epoch; ``loss`` is the batch's summed loss,
        detached and still on the device (reading it syncs)."""

    def on_epoch_end(self, state: FitState) -> None:
        """After an epoch and its validation, with ``state.history[-1]`` its metrics."""

    def on_fit_end(self, state: FitState) -> None:
        """After the last epoch, also when training stops early or fails."""


class Checkpointing(Callback):
    """Writes a :class:`~pyrovae.inference.experiment.runs.Checkpoint` after every epoch
    and, with ``resume``, continues from the one already in ``run_dir``.

    Args:
        run_dir: an existing directory.
        features, image_shape, spec: stored in every checkpoint (the spec as TOML).
        resume: restore model, guide, optimizer, RNG states and history at the start.
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        features: int | None = None,
        image_shape: Sequence[int] = (),
        spec: str | None = None,
        resume: bool = True,
    ) -> None:
        self.run_dir = Path(run_dir)
        if not self.run_dir.is_dir():
            raise PyrovaeError(f"run directory {self.run_dir} does not exist; create it first")
        self.features = features
        self.image_shape = tuple(image_shape)
        self.spec = spec
        self.resume = resume
        self.latest: Checkpoint | None = None

    def on_fit_start(self, state: FitState) -> None:
        if not self.resume:
            return
        checkpoint = Checkpoint.load(self.run_dir, _device_of(state.loss_fn))
        if checkpoint is None:
            return
        checkpoint.restore(state.model, state.guide, state.optimizer, self.run_dir)
        _set_rng_state(checkpoint.rng)
        state.history[:] = checkpoint.history
        state.epoch = checkpoint.epoch
        self.latest = checkpoint

    def on_epoch_end(self, state: FitState) -> None:
        self.latest = Checkpoint(
            epoch=state.epoch,
            model=state.model.state_dict(),
            guide=state.guide.state_dict(),
            optimizer=state.optimizer.state_dict(),
            rng=_rng_state(),
            history=list(state.history),
            features=self.features,
            image_shape=self.image_shape,
            spec=self.spec,
        )
        self.latest.save(self.run_dir)


class EarlyStopping(Callback):
    """Stops when the validation ELBO has not improved for ``patience`` epochs.

    Args:
        patience: epochs without improvement to wait, at least 1.
        monitor: the history key to maximise.
    """

    def __init__(self, patience: int, monitor: str = "validation_elbo") -> None:
        if isinstance(patience, bool) or int(patience) != patience or patience < 1:
            raise PyrovaeError(f"patience must be an integer of at least 1, got {patience!r}")
        self.patience = int(patience)
        self.monitor = monitor

    def _epochs_since_best(self, history: list[dict[str, float]]) -> int:
        scores = [h[self.monitor] for h in history]
        if not scores:
            return 0
        best_at = max(range(len(scores)), key=lambda i: (scores[i], -i))
        return len(scores) - 1 - best_at

    def on_fit_start(self, state: FitState) -> None:
        state.stop = state.stop or self._epochs_since_best(state.history) >= self.patience

    def on_epoch_end(self, state: FitState) -> None:
        state.stop = state.stop or self._epochs_since_best(state.history) >= self.patience


class ProgressBar(Callback):
    """A tqdm bar over the optimizer steps with the running ELBO; none when the output is
    not a terminal (logs, CI)."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None
        self._total: Tensor | None = None

    def on_fit_start(self, state: FitState) -> None:
        remaining = state.steps_per_epoch * max(0, state.epochs - len(state.history))
        self.bar = tqdm(total=remaining, unit="batch", disable=None)
        # Reading the running loss syncs with the device: a few times per epoch only.
        self.refresh = max(1, state.steps_per_epoch // 10)

    def on_step_end(self, state: FitState, step: int, loss: Tensor) -> None:
        if self.bar is None or self.bar.disable:
            return
        if step == 0:
            self.bar.set_description(f"epoch {state.epoch}/{state.epochs}")
            self._total = torch.zeros_like(loss)
        self._total += loss
        if (step + 1) % self.refresh == 0:
            running = -self._total.item() / ((step + 1) * state.batch_size)
            self.bar.set_postfix(elbo=f"{running:.2f}", refresh=False)
            self.bar.update(self.refresh)

    def on_epoch_end(self, state: FitState) -> None:
        if self.bar is None:
            return
        done = state.steps_per_epoch // self.refresh * self.refresh
        self.bar.update(state.steps_per_epoch - done)
        last = state.history[-1]
        self.bar.set_postfix(
            elbo=f"{last['train_elbo']:.2f}", validation=f"{last['validation_elbo']:.2f}"
        )

    def on_fit_end(self, state: FitState) -> None:
        if self.bar is not None:
            self.bar.close()


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


def fit(
    model: Callable[..., Any],
    guide: Callable[..., Any],
    train: Tensor | np.ndarray,
    *,
    validation: Tensor | np.ndarray | None = None,
    objective: Any = None,
    kl_schedule: KLSchedule | None = None,
    epochs: int = 10,
    batch_size: int = 128,
    lr: float = 1e-3,
    optimizer: torch.optim.Optimizer | None = None,
    grad_clip: float | None = None,
    patience: int | None = None,
    transform: Callable[[Tensor], Tensor] | None = None,
    device: str | torch.device = "auto",
    seed: int | None = 0,
    callbacks: Sequence[Callback] = (),
    run_dir: str | Path | None = None,
    progress: bool = True,
) -> list[dict[str, float]]:
    """Trains ``model`` and ``guide`` by minimising ``objective(model, guide)``.

    The whole training set is kept on the device when it fits; each epoch shuffles it with
    the global torch RNG, so a seeded CPU run is reproducible. The loss is the negative
    objective averaged over the batch. After every epoch the validation data are scored
    (ELBO, reconstruction and KL per point, from one draw) and the callbacks run.

    Args:
        model: the Pyro model: an ``nn.Module`` whose ``forward(x)`` observes ``x``, or a
            plain function whose parameters are ``pyro.param`` / ``pyro.module`` sites.
        guide: the Pyro guide, taking the same ``x``; a module or a function likewise.
        train: training data ``(N, F)``, a tensor or a NumPy array.
        validation: validation data, scored after every epoch.
        objective: a Pyro ELBO (``objective(model, guide)`` is the loss module);
            default ``pyrovae.inference.elbo()``.
        kl_schedule: a KL schedule (``pyrovae.inference.algorithms.schedules``): optimizer
            step ``s`` of the run, counted over all epochs (so a resumed run picks it up where
            it was), computes the loss under ``kl_schedule.handler(s)``. Those handlers change
            gradients only: the logged and evaluated ELBO stays the true one.
        epochs: total number of epochs, counting those a restored run already has.
        batch_size: points per step.
        lr: learning rate of the default Adam optimizer.
        optimizer: a ``torch.optim`` optimizer over the loss module's parameters, instead.
        grad_clip: clip the gradient norm to this value.
        patience: shorthand for an :class:`EarlyStopping` callback.
        transform: applied to every training batch on the device, e.g. ``torch.bernoulli``
            for dynamic binarization.
        device: ``auto``, ``cpu``, ``cuda``...; modules are moved there.
        seed: seeds torch and Pyro at the start (a restored run then sets its saved RNG
            states).
        callbacks: :class:`Callback` objects, called in order.
        run_dir: shorthand for a :class:`Checkpointing` callback in this existing directory
            (written every epoch, resumed from when it holds a checkpoint).
        progress: show a progress bar (a :class:`ProgressBar` callback).

    Returns:
        The history: one dict per epoch with ``epoch``, ``train_elbo``,
        ``validation_elbo``, ``validation_reconstruction``, ``validation_kl`` (NaN without
        validation data), ``seconds`` (training only) and ``images_per_s``.

    Raises:
        TrainingDiverged: the loss became NaN or infinite.
        PyrovaeError: bad data or settings, found before any training.
    """
    _check_settings(epochs, batch_size, lr, grad_clip)
    device = resolve_device(device)
    for part in (model, guide):
        if isinstance(part, nn.Module):
            part.to(device)
    dtype = _floating_dtype(model, guide)
    x_train = _as_data(train, "training data", dtype)
    x_val = _as_data(validation, "validation data", dtype) if validation is not None else None
    check_inputs(model, x_train, x_val)
    callbacks = list(callbacks)
    if run_dir is not None:
        callbacks.insert(0, Checkpointing(run_dir, features=x_train.shape[1]))
    if patience is not None:
        if x_val is None:
            raise PyrovaeError("early stopping (patience) needs validation data")
        callbacks.append(EarlyStopping(patience))
    if progress:
        callbacks.append(ProgressBar())
    if seed is not None:
        pyro.set_rng_seed(seed)

    x_train = _place(x_train, device)
    x_val = _place(x_val, device) if x_val is not None else None
    loss_fn = (objective or elbo())(model, guide)
    params = _parameters(loss_fn, x_train[:batch_size].to(device), transform)
    optimizer = optimizer or torch.optim.Adam(params, lr=lr)
    steps = math.ceil(x_train.shape[0] / batch_size)
    state = FitState(model, guide, loss_fn, optimizer, epochs, steps, batch_size)

    # The data were checked once above; per-step argument checks would only cost time.
    with pyro.validation_enabled(False):
        try:
            for callback in callbacks:
                callback.on_fit_start(state)
            while len(state.history) < epochs and not state.stop:
                state.epoch = len(state.history) + 1
                seconds, train_elbo = _train_epoch(
                    state, callbacks, params, x_train, batch_size, grad_clip, transform, kl_schedule
                )
                if not math.isfinite(train_elbo):
                    raise TrainingDiverged(_diverged(state.epoch, callbacks))
                state.history.append(
                    {
                        "epoch": state.epoch,
                        "train_elbo": train_elbo,
                        **_validate(loss_fn, x_val, batch_size, device),
                        "seconds": seconds,
                        "images_per_s": len(x_train) / seconds,
                    }
                )
                for callback in callbacks:
                    callback.on_epoch_end(state)
        finally:
            for callback in callbacks:
                callback.on_fit_end(state)
    return state.history


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


def _check_settings(epochs: int, batch_size: int, lr: float, grad_clip: float | None) -> None:
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise PyrovaeError(f"{name} must be an integer of at least 1, got {value!r}")
    if not (isinstance(lr, int | float) and math.isfinite(lr) and lr >= 0):
        raise PyrovaeError(f"lr must be a finite number of at least 0, got {lr!r}")
    if grad_clip is not None and not (math.isfinite(grad_clip) and grad_clip > 0):
        raise PyrovaeError(f"grad_clip must be a finite number above 0, got {grad_clip!r}")


def _floating_dtype(*parts: Any) -> torch.dtype:
    """The dtype of the first floating-point parameter of the modules, else torch's default."""
    for part in parts:
        if isinstance(part, nn.Module):
            for p in part.parameters():
                if p.is_floating_point():
                    return p.dtype
    return torch.get_default_dtype()


def _as_data(x: Tensor | np.ndarray, what: str, dtype: torch.dtype) -> Tensor:
    """Data as a floating tensor of the model's dtype; integer data are refused."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, Tensor):
        raise PyrovaeError(f"{what} must be a torch.Tensor or NumPy array, got {type(x).__name__}")
    if not x.is_floating_point():
        raise PyrovaeError(
            f"{what} has integer dtype {x.dtype}; pass floats (e.g. x / 255.0 for 8-bit images)"
        )
    return x.to(dtype)


def _parameters(
    loss_fn: nn.Module, x: Tensor, transform: Callable[[Tensor], Tensor] | None
) -> list[Tensor]:
    """The loss module's parameters, and those of ``pyro.param`` / ``pyro.module`` sites of
    plain-function programs, captured from one traced evaluation of the loss as Pyro's
    ``SVI`` does."""
    params = list(loss_fn.parameters())
    if isinstance(loss_fn.model, nn.Module) and isinstance(loss_fn.guide, nn.Module):
        return params
    with torch.no_grad(), poutine.trace(param_only=True) as capture:
        loss_fn(transform(x) if transform is not None else x)
    seen = {id(p) for p in params}
    for site in capture.trace.nodes.values():
        unconstrained = site["value"].unconstrained()
        if id(unconstrained) not in seen:
            seen.add(id(unconstrained))
            params.append(unconstrained)
    return params


def _train_epoch(
    state: FitState,
    callbacks: list[Callback],
    params: list[Tensor],
    x_train: Tensor,
    batch_size: int,
    grad_clip: float | None,
    transform: Callable[[Tensor], Tensor] | None,
    kl_schedule: KLSchedule | None,
) -> tuple[float, float]:
    loss_fn, optimizer = state.loss_fn, state.optimizer
    loss_fn.train()
    n = x_train.shape[0]
    device = _device_of(loss_fn, x_train.device)
    order = torch.randperm(n, device=x_train.device)
    first_step = (state.epoch - 1) * state.steps_per_epoch
    total = torch.zeros((), device=device)
    start_time = time.perf_counter()
    for step, start in enumerate(range(0, n, batch_size)):
        x = x_train[order[start : start + batch_size]].to(device, non_blocking=True)
        if transform is not None:
            x = transform(x)
        if kl_schedule is None:
            loss = loss_fn(x)
        else:
            with kl_schedule.handler(first_step + step):
                loss = loss_fn(x)
        optimizer.zero_grad(set_to_none=True)
        (loss / x.shape[0]).backward()
        if grad_clip is not None:
            nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        loss = loss.detach()
        total += loss
        for callback in callbacks:
            callback.on_step_end(state, step, loss)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start_time
    return seconds, -total.item() / n


@torch.no_grad()
def _validate(
    loss_fn: nn.Module, x: Tensor | None, batch_size: int, device: torch.device
) -> dict[str, float]:
    """Validation ELBO and its two terms per point, from one draw of z per point.

    Uses the importance-sampling estimator with K = 1, which gives the plain (unscaled) ELBO
    split into E_q[log p(x|z)] and KL whatever the training objective; a model it cannot
    score per point (a latent outside the data plate) gets the objective's value instead.
    """
    nan = float("nan")
    if x is None:
        return {"validation_elbo": nan, "validation_reconstruction": nan, "validation_kl": nan}
    loss_fn.eval()
    try:
        terms = log_marginal_likelihood(loss_fn.model, loss_fn.guide, x, num_samples=1)
    except ValueError:
        total = torch.zeros((), device=device, dtype=torch.float64)
        for part in x.split(max(batch_size, 1024)):
            total += loss_fn(part.to(device)).double()
        elbo_value = -total.item() / x.shape[0]
        return {
            "validation_elbo": elbo_value,
            "validation_reconstruction": nan,
            "validation_kl": nan,
        }
    return {
        "validation_elbo": terms.elbo.mean().item(),
        "validation_reconstruction": terms.reconstruction.mean().item(),
        "validation_kl": terms.kl.mean().item(),
    }


def _place(x: Tensor, device: torch.device) -> Tensor:
    """The data on ``device`` when it fits in half the free memory there, else pinned on the host."""
    if device.type != "cuda":
        return x.to(device)
    free, _ = torch.cuda.mem_get_info(device)
    if x.numel() * x.element_size() < free // 2:
        return x.to(device)
    return x.pin_memory()


def _device_of(module: nn.Module, default: torch.device | str = "cpu") -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device(default)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


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
