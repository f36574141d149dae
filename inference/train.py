"""Training: ``objective(model, guide)`` minimised with a plain ``torch.optim`` optimizer."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyro
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from inference.data import check_data
from inference.errors import PyrovaeError
from inference.marginal import log_marginal_likelihood
from inference.objectives import elbo
from inference.runs import load_states, read_checkpoint, save_checkpoint
from inference.schedules import KLSchedule


class TrainingDiverged(PyrovaeError):
    """The loss became NaN or infinite; the run keeps its last good checkpoint."""


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` is CUDA when present, else the CPU; anything else is passed to torch."""
    if str(device) == "auto":
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
    model: nn.Module,
    guide: nn.Module,
    train: Tensor,
    *,
    validation: Tensor | None = None,
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
    run_dir: str | Path | None = None,
    metadata: dict[str, Any] | None = None,
    progress: bool = True,
) -> list[dict[str, float]]:
    """Trains ``model`` and ``guide`` by minimising ``objective(model, guide)``.

    The whole training set is kept on the device when it fits; each epoch shuffles it with
    the global torch RNG, so a seeded CPU run is reproducible. The loss is the negative
    objective averaged over the batch. With ``run_dir`` a checkpoint and ``metrics.csv`` are
    written after every epoch, and a checkpoint already there is resumed from: ``epochs`` is
    the total, so a finished 4-epoch run given ``epochs=8`` trains 4 more.

    Args:
        model: the Pyro model, an ``nn.Module`` whose ``forward(x)`` observes ``x``.
        guide: the Pyro guide, an ``nn.Module`` taking the same ``x``.
        train: training data ``(N, F)``.
        validation: validation data, evaluated after every epoch.
        objective: a Pyro ELBO (``objective(model, guide)`` is the loss module);
            default ``inference.objectives.elbo()``.
        kl_schedule: a KL schedule (``inference.schedules``): optimizer step ``s`` of the
            run, counted over all epochs (so a resumed run picks it up where it was), computes
            the loss under ``kl_schedule.handler(s)``. Those handlers change gradients only:
            the logged and evaluated ELBO stays the true one.
        epochs: total number of epochs.
        batch_size: points per step.
        lr: learning rate of the default Adam optimizer.
        optimizer: a ``torch.optim`` optimizer over the loss module's parameters, instead.
        grad_clip: clip the gradient norm to this value.
        patience: stop when the validation ELBO has not improved for this many epochs.
        transform: applied to every training batch on the device, e.g. ``torch.bernoulli``
            for dynamic binarization.
        device: ``auto``, ``cpu``, ``cuda``...
        seed: seeds torch and Pyro at the start of a fresh run (not on resume).
        run_dir: where checkpoints and metrics go (the directory must exist).
        metadata: plain values stored in every checkpoint (e.g. the data's shape).
        progress: show a progress bar with the running ELBO.

    Returns:
        One dict per epoch: ``epoch``, ``train_elbo``, ``validation_elbo`` (NaN without
        validation data), ``seconds`` (training only) and ``images_per_s``.

    Raises:
        TrainingDiverged: the loss became NaN or infinite.
    """
    check_inputs(model, train, validation)
    if patience is not None and validation is None:
        raise PyrovaeError("early stopping (patience) needs validation data")
    device = resolve_device(device)
    model.to(device)
    guide.to(device)
    loss_fn = (objective or elbo())(model, guide)
    params = list(loss_fn.parameters())
    optimizer = optimizer or torch.optim.Adam(params, lr=lr)

    run_dir = Path(run_dir) if run_dir is not None else None
    history: list[dict[str, float]] = []
    checkpoint = read_checkpoint(run_dir, device) if run_dir is not None else None
    if checkpoint is not None:
        load_states(run_dir, model, guide, checkpoint)
        optimizer.load_state_dict(checkpoint["optimizer"])
        _set_rng_state(checkpoint["rng"])
        history = list(checkpoint["history"])
    elif seed is not None:
        pyro.set_rng_seed(seed)

    x_train = _place(train, device)
    x_val = _place(validation, device) if validation is not None else None
    best = max((h["validation_elbo"] for h in history), default=-float("inf"))
    bad_epochs = _epochs_since_best(history)

    steps = math.ceil(x_train.shape[0] / batch_size)
    # disable=None: no bar when the output is not a terminal (logs, CI).
    bar = tqdm(
        total=steps * max(0, epochs - len(history)),
        unit="batch",
        disable=None if progress else True,
    )
    # The data were checked once above; per-step argument checks would only cost time.
    with bar, pyro.validation_enabled(False):
        for epoch in range(len(history) + 1, epochs + 1):
            if patience is not None and bad_epochs >= patience:
                break
            bar.set_description(f"epoch {epoch}/{epochs}")
            seconds, train_elbo = _train_epoch(
                loss_fn,
                optimizer,
                params,
                x_train,
                batch_size,
                device,
                grad_clip,
                transform,
                bar,
                kl_schedule,
                (epoch - 1) * steps,
            )
            if not math.isfinite(train_elbo):
                raise TrainingDiverged(_diverged(epoch, run_dir))
            validation_terms = _validate(loss_fn, x_val, batch_size, device)
            val_elbo = validation_terms["validation_elbo"]
            history.append(
                {
                    "epoch": epoch,
                    "train_elbo": train_elbo,
                    **validation_terms,
                    "seconds": seconds,
                    "images_per_s": len(train) / seconds,
                }
            )
            bar.set_postfix(elbo=f"{train_elbo:.2f}", validation=f"{val_elbo:.2f}")
            if val_elbo > best:
                best, bad_epochs = val_elbo, 0
            else:
                bad_epochs += 1
            if run_dir is not None:
                save_checkpoint(
                    run_dir,
                    {
                        "epoch": epoch,
                        "model": model.state_dict(),
                        "guide": guide.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "rng": _rng_state(),
                        "history": history,
                        **(metadata or {}),
                    },
                )
    return history


def check_inputs(model: nn.Module, train: Tensor, validation: Tensor | None = None) -> None:
    """Checks the data once, up front, against the model's likelihood where it declares a support.

    Raises:
        PyrovaeError: NaN or infinite values, a wrong shape, or values outside the support.
    """
    # A likelihood may declare the support of the data it scores (a torch constraint).
    support = getattr(getattr(model, "likelihood", None), "support", None)
    check_data(train, "training data", support)
    if validation is not None:
        check_data(validation, "validation data", support)


def _train_epoch(
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    params: list[nn.Parameter],
    x_train: Tensor,
    batch_size: int,
    device: torch.device,
    grad_clip: float | None,
    transform: Callable[[Tensor], Tensor] | None,
    bar: tqdm,
    kl_schedule: KLSchedule | None = None,
    first_step: int = 0,
) -> tuple[float, float]:
    loss_fn.train()
    n = x_train.shape[0]
    order = torch.randperm(n, device=x_train.device)
    starts = range(0, n, batch_size)
    # Reading the running loss syncs with the device, so do it a few times per epoch only.
    refresh = max(1, len(starts) // 10)
    total = torch.zeros((), device=device)
    start_time = time.perf_counter()
    for step, start in enumerate(starts):
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
        total += loss.detach()
        if not bar.disable and (step + 1) % refresh == 0:
            running = -total.item() / min(n, start + batch_size)
            if not math.isfinite(running):
                break
            bar.set_postfix(elbo=f"{running:.2f}", refresh=False)
            bar.update(refresh)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start_time
    bar.update(len(starts) - len(starts) // refresh * refresh)
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
        elbo = evaluate_elbo(loss_fn, x, batch_size, device)
        return {"validation_elbo": elbo, "validation_reconstruction": nan, "validation_kl": nan}
    return {
        "validation_elbo": terms.elbo.mean().item(),
        "validation_reconstruction": terms.reconstruction.mean().item(),
        "validation_kl": terms.kl.mean().item(),
    }


def evaluate_elbo(loss_fn: nn.Module, x: Tensor, batch_size: int, device: torch.device) -> float:
    """The mean ELBO per point of ``x`` under the loss module ``loss_fn``."""
    loss_fn.eval()
    total = torch.zeros((), device=device, dtype=torch.float64)
    for start in range(0, x.shape[0], max(batch_size, 1024)):
        total += loss_fn(x[start : start + max(batch_size, 1024)].to(device)).double()
    return -total.item() / x.shape[0]


def _place(x: Tensor, device: torch.device) -> Tensor:
    """The data on ``device`` when it fits in half the free memory there, else pinned on the host."""
    if device.type != "cuda":
        return x.to(device)
    free, _ = torch.cuda.mem_get_info(device)
    if x.numel() * x.element_size() < free // 2:
        return x.to(device)
    return x.pin_memory()


def _epochs_since_best(history: list[dict[str, float]]) -> int:
    scores = [h["validation_elbo"] for h in history]
    if not scores:
        return 0
    best_at = max(range(len(scores)), key=lambda i: (scores[i], -i))
    return len(scores) - 1 - best_at


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _diverged(epoch: int, run_dir: Path | None) -> str:
    kept = f"; the last good checkpoint (epoch {epoch - 1}) is kept in {run_dir}" if run_dir else ""
    return (
        f"the loss became NaN or infinite in epoch {epoch}{kept}; lower train.lr or set "
        "train.grad_clip"
    )
