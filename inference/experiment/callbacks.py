"""Callbacks of the training loop: checkpoints, early stopping and the progress bar.

:func:`~pyrovae.inference.experiment.training.fit` is the loop and nothing else; what happens
around it is a :class:`Callback`, in the manner of Lightning's ``Callback.on_train_epoch_end``:
each hook gets the :class:`FitState` and may read or change it (``state.stop = True`` ends
training after the epoch).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pyro import poutine
from torch import Tensor, nn
from tqdm.auto import tqdm

from pyrovae.inference.errors import PyrovaeError, check_int
from pyrovae.inference.experiment.distributed import rank_and_world
from pyrovae.inference.experiment.runs import BEST, Checkpoint, RunDirectory
from pyrovae.model.labelled import Labelled
from pyrovae.model.networks import image_layout
from pyrovae.model.sites import OBSERVED

__all__ = [
    "COLLAPSE_KL",
    "BatchTransform",
    "Callback",
    "Checkpointing",
    "CollapseAlarm",
    "DivergenceAlarm",
    "EarlyStopping",
    "FitState",
    "GradientClipping",
    "ProgressBar",
    "TensorBoard",
    "collapse_message",
]


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
        lr_scheduler: the learning-rate scheduler, or None.
        rank, world_size: this process's rank and the number of processes; callbacks run on
            every rank, and those with side effects (files, printing) act on rank 0 only.
        history: one dict per finished epoch; a callback restoring a run fills it in
            :meth:`Callback.on_fit_start`, and the loop continues after its last epoch.
        epoch: the epoch running or last finished (0 before the first).
        stop: set by a callback to end training after the current epoch.
        warmup_epochs: the epochs of the run's warm-ups, the longest of the KL schedule's
            (its ``warmup_steps`` in whole epochs) and the callbacks' own
            (:attr:`Callback.warmup_epochs`, a guide warm-up's). A warm-up lowers the ELBO
            by design or trains another guide, so early stopping and the best epoch count
            from the epoch after it: the one rule, kept here.
    """

    model: Any
    guide: Any
    loss_fn: nn.Module
    optimizer: torch.optim.Optimizer
    epochs: int
    steps_per_epoch: int
    batch_size: int
    lr_scheduler: Any = None
    rank: int = 0
    world_size: int = 1
    history: list[dict[str, float]] = field(default_factory=list)
    epoch: int = 0
    stop: bool = False
    warmup_epochs: int = 0

    @property
    def first_counted(self) -> int:
        """The first epoch that early stopping and the choice of the best epoch count."""
        return self.warmup_epochs + 1


class Callback:
    """Hooks of the training loop; subclass and override the ones you need."""

    warmup_epochs: int = 0
    """Epochs at the start in which this callback holds training in a warm-up (see
    :attr:`FitState.warmup_epochs`)."""

    def on_fit_start(self, state: FitState) -> None:
        """Before the first epoch (after seeding): restore state, open files or bars."""

    def on_epoch_start(self, state: FitState) -> None:
        """Before the optimizer steps of epoch ``state.epoch``."""

    def transform_batch(self, state: FitState, x: Tensor) -> Tensor:
        """The training batch ``x`` (on the device) as the step should see it."""
        return x

    def on_before_optimizer_step(self, state: FitState) -> None:
        """After the gradients of a step are computed, before the optimizer uses them."""

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
        run_dir: an existing directory, or the :class:`RunDirectory` of a run being
            written (a staged run moves once its first checkpoint exists; the callback
            writes wherever it is).
        features, image_shape, spec, data_sha256: stored in every checkpoint (the spec as
            TOML, the data's fingerprint as ``Splits.fingerprint`` gives it).
        resume: restore model, guide, optimizer, RNG states and history at the start.
        best: also keep ``best.pt``, model and guide at the epoch whose history value of
            this key (``"validation_elbo"``) is the highest so far; None: no best.
        best_from: the first epoch that may be the best; None: the first after the
            warm-ups (:attr:`FitState.first_counted`), as early stopping counts.
    """

    def __init__(
        self,
        run_dir: str | Path | RunDirectory,
        *,
        features: int | None = None,
        image_shape: Sequence[int] = (),
        spec: str | None = None,
        data_sha256: str | None = None,
        resume: bool = True,
        best: str | None = None,
        best_from: int | None = None,
    ) -> None:
        self.directory = run_dir if isinstance(run_dir, RunDirectory) else RunDirectory(run_dir)
        # Rank 0 writes the run; the other ranks of a distributed run only read it.
        self.writes = rank_and_world()[0] == 0
        if self.writes and not self.run_dir.is_dir():
            raise PyrovaeError(f"run directory {self.run_dir} does not exist; create it first")
        self.features = features
        self.image_shape = tuple(image_shape)
        self.spec = spec
        self.data_sha256 = data_sha256
        self.resume = resume
        self.best = best
        self.best_from = best_from
        self.latest: Checkpoint | None = None

    @property
    def run_dir(self) -> Path:
        """Where the run is now."""
        return self.directory.path

    def on_fit_start(self, state: FitState) -> None:
        if not self.resume:
            return
        if not self.run_dir.is_dir():
            return
        checkpoint = Checkpoint.load(self.run_dir, device_of(state.loss_fn))
        if checkpoint is None:
            return
        checkpoint.restore(state.model, state.guide, state.optimizer, self.run_dir)
        if state.lr_scheduler is not None and checkpoint.lr_scheduler:
            state.lr_scheduler.load_state_dict(checkpoint.lr_scheduler)
        _set_rng_state(checkpoint.rng)
        state.history[:] = checkpoint.history
        state.epoch = checkpoint.epoch
        self.latest = checkpoint

    def on_epoch_end(self, state: FitState) -> None:
        latest = Checkpoint(
            epoch=state.epoch,
            model=state.model.state_dict(),
            guide=state.guide.state_dict(),
            optimizer=state.optimizer.state_dict(),
            lr_scheduler={} if state.lr_scheduler is None else state.lr_scheduler.state_dict(),
            rng=_rng_state(),
            history=list(state.history),
            features=self.features,
            image_shape=self.image_shape,
            spec=self.spec,
            data_sha256=self.data_sha256,
        )
        if self.writes:
            latest.save(self.run_dir)
        # Only a checkpoint on disk is the latest: a failed save leaves the one before.
        self.latest = latest
        if self.writes and self.best is not None and self._is_best(state):
            best = Checkpoint(
                epoch=state.epoch,
                model=latest.model,
                guide=latest.guide,
                history=latest.history,
                features=self.features,
                image_shape=self.image_shape,
                spec=self.spec,
                data_sha256=self.data_sha256,
            )
            best.save(self.run_dir, BEST)

    def _is_best(self, state: FitState) -> bool:
        """Whether the last epoch's ``best`` value is the highest since ``best_from`` (the
        first of equal values wins, as in early stopping)."""
        history = state.history
        start = state.first_counted if self.best_from is None else self.best_from
        # An epoch recorded before this key was (a run resumed from an older one) never wins.
        scores = [h.get(self.best, -math.inf) for h in history if h["epoch"] >= start]
        if not scores or history[-1]["epoch"] < start:
            return False
        last = scores[-1]
        return math.isfinite(last) and all(not s >= last for s in scores[:-1])


class EarlyStopping(Callback):
    """Stops when the validation ELBO (or ``monitor``) has not improved for ``patience``
    epochs.

    Args:
        patience: epochs without improvement to wait, at least 1.
        monitor: the history key to maximise; ``"validation_bound"`` follows the bound an
            importance-weighted objective trains, as ``train_run`` does for one with k > 1.
        start_epoch: the first epoch that counts; None: the first after the run's warm-ups
            (:attr:`FitState.first_counted`: a KL warm-up lowers the ELBO by design while
            it runs, a guide warm-up trains another guide).

    Example:
        >>> import torch
        >>> from pyrovae.inference import fit
        >>> from pyrovae.guides import AmortizedGuide, DiagonalNormal
        >>> from pyrovae.model import VAE, Gaussian, StandardNormal
        >>> vae = VAE(StandardNormal(2), torch.nn.Linear(2, 5), Gaussian(scale=0.5))
        >>> guide = AmortizedGuide(DiagonalNormal(5, 2))
        >>> x, x_val = torch.randn(64, 5), torch.randn(16, 5)
        >>> history = fit(vae, guide, x, validation=x_val, epochs=3, callbacks=[EarlyStopping(5)])
        >>> [h["epoch"] for h in history]  # five epochs without improvement: not yet
        [1, 2, 3]
    """

    def __init__(
        self, patience: int, monitor: str = "validation_elbo", start_epoch: int | None = None
    ) -> None:
        self.patience = check_int(patience, "patience", error=PyrovaeError)
        self.monitor = monitor
        self.start_epoch = start_epoch

    def _epochs_since_best(self, state: FitState) -> int:
        start = state.first_counted if self.start_epoch is None else self.start_epoch
        scores = [h.get(self.monitor, -math.inf) for h in state.history if h["epoch"] >= start]
        if not scores:
            return 0
        best_at = max(range(len(scores)), key=lambda i: (scores[i], -i))
        return len(scores) - 1 - best_at

    def on_fit_start(self, state: FitState) -> None:
        state.stop = state.stop or self._epochs_since_best(state) >= self.patience

    def on_epoch_end(self, state: FitState) -> None:
        state.stop = state.stop or self._epochs_since_best(state) >= self.patience


class GradientClipping(Callback):
    """Clips the gradient norm of the optimizer's parameters before every step
    (``torch.nn.utils.clip_grad_norm_``).

    Args:
        max_norm: the largest norm of all gradients together, a finite number above 0.
    """

    def __init__(self, max_norm: float) -> None:
        if isinstance(max_norm, bool) or not (
            isinstance(max_norm, int | float) and math.isfinite(max_norm) and max_norm > 0
        ):
            raise PyrovaeError(f"grad_clip must be a finite number above 0, got {max_norm!r}")
        self.max_norm = float(max_norm)

    def on_before_optimizer_step(self, state: FitState) -> None:
        params = [p for group in state.optimizer.param_groups for p in group["params"]]
        nn.utils.clip_grad_norm_(params, self.max_norm)


class BatchTransform(Callback):
    """Applies ``fn`` to every training batch on the device, e.g. ``torch.bernoulli`` for
    dynamic binarization (a fresh binary image from the grey levels at every step).

    Example:
        >>> import torch
        >>> from pyrovae.guides import AmortizedGuide, DiagonalNormal
        >>> from pyrovae.inference import fit
        >>> from pyrovae.model import VAE, Bernoulli, StandardNormal
        >>> vae = VAE(StandardNormal(2), torch.nn.Linear(2, 5), Bernoulli())
        >>> guide = AmortizedGuide(DiagonalNormal(5, 2))
        >>> grey_images = torch.rand(64, 5)
        >>> batches = []
        >>> binarize = BatchTransform(lambda x: batches.append(torch.bernoulli(x)) or batches[-1])
        >>> history = fit(vae, guide, grey_images, epochs=2, callbacks=[binarize])
        >>> len(batches) > 0 and all(set(b.unique().tolist()) <= {0.0, 1.0} for b in batches)
        True
    """

    def __init__(self, fn: Callable[[Tensor], Tensor]) -> None:
        if not callable(fn):
            raise PyrovaeError(f"BatchTransform needs a function of the batch, got {fn!r}")
        self.fn = fn

    def transform_batch(self, state: FitState, x: Tensor | Labelled) -> Tensor | Labelled:
        return x.map(self.fn) if isinstance(x, Labelled) else self.fn(x)


COLLAPSE_KL = 0.1
"""Below this validation KL (nats per point) the latents carry almost nothing about x."""


def collapse_message(history: list[dict[str, float]], epochs: int = 2) -> str | None:
    """The posterior-collapse warning for a training history, or None when healthy.

    Collapse is a validation KL below :data:`COLLAPSE_KL` nats, or no active unit, for the
    last ``epochs`` epochs; the message names the likely causes and their remedies.
    """
    recent = history[-epochs:]
    if len(recent) < epochs:
        return None
    low_kl = all(h.get("validation_kl", math.nan) < COLLAPSE_KL for h in recent)
    inactive = all(h.get("validation_active_units", math.nan) == 0 for h in recent)
    if not (low_kl or inactive):
        return None
    last = recent[-1]
    return (
        f"posterior collapse: validation KL {last['validation_kl']:.3f} nats and "
        f"{last.get('validation_active_units', math.nan):.0f} active units for {epochs} "
        "epochs, so the decoder ignores z; likely causes: a learned prior that matches a "
        'constant encoder (add KL warm-up: train.kl = { kind = "linear", warmup_steps = '
        "... }), a Gaussian likelihood scale too large (lower model.likelihood.scale or set "
        "learn_scale = true), or too weak a decoder signal (free bits: train.kl = "
        '{ kind = "free_bits", lambda_ = 0.5 })'
    )


class CollapseAlarm(Callback):
    """Prints one warning line, once, when training shows posterior collapse
    (:func:`collapse_message`).

    Args:
        epochs: how many consecutive epochs the symptom must last.
        grace: the first epochs, which do not count: a model often starts collapsed and
            uses its latents a few epochs later (a learned likelihood scale that is still
            large, say). Default: a tenth of the planned epochs, at least 2.
        stream: where the line goes (default: stderr, through tqdm so a bar stays intact).
    """

    def __init__(self, epochs: int = 2, grace: int | None = None, stream: Any = None) -> None:
        self.epochs = epochs
        self.grace = grace
        self.stream = stream
        self.message: str | None = None

    def on_epoch_end(self, state: FitState) -> None:
        if self.message is None:
            grace = max(2, state.epochs // 10) if self.grace is None else self.grace
            counted = [h for h in state.history if h["epoch"] > grace]
            self.message = collapse_message(counted, self.epochs)
            if self.message is not None and state.rank == 0:
                tqdm.write(f"pyrovae: warning: {self.message}", file=self.stream or sys.stderr)


DIVERGENCE_FACTOR = 10
"""A training bound more than this many times its scale (at least 100 nats) below the best
epoch's is divergence: no ordinary epoch-to-epoch noise comes close."""


def divergence_message(history: list[dict[str, float]]) -> str | None:
    """The divergence warning for a training history, or None: the last epoch's training
    bound fell far below the best so far (:data:`DIVERGENCE_FACTOR`) while staying finite
    (a NaN stops training with its own error)."""
    finite = [h for h in history if math.isfinite(h.get("train_elbo", math.nan))]
    if len(finite) < 2:
        return None
    best = max(finite[:-1], key=lambda h: h["train_elbo"])
    last = finite[-1]
    drop = best["train_elbo"] - last["train_elbo"]
    if drop <= DIVERGENCE_FACTOR * max(abs(best["train_elbo"]), 100.0):
        return None
    return (
        f"training is diverging: the training bound fell from {best['train_elbo']:.4g} "
        f"(epoch {best['epoch']}) to {last['train_elbo']:.4g} nats/point (epoch "
        f"{last['epoch']}); lower train.lr or set train.grad_clip"
    )


class DivergenceAlarm(Callback):
    """Prints one warning line, once, when the training bound diverges
    (:func:`divergence_message`): a run that ends finite but far worse than it was.

    Args:
        stream: where the line goes (default: stderr, through tqdm so a bar stays intact).
    """

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream
        self.message: str | None = None

    def on_epoch_end(self, state: FitState) -> None:
        if self.message is None:
            self.message = divergence_message(state.history)
            if self.message is not None and state.rank == 0:
                tqdm.write(f"pyrovae: warning: {self.message}", file=self.stream or sys.stderr)


class ProgressBar(Callback):
    """A tqdm bar over the optimizer steps with the running ELBO; none when the output is
    not a terminal (logs, CI)."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None
        self._total: Tensor | None = None

    def on_fit_start(self, state: FitState) -> None:
        remaining = state.steps_per_epoch * max(0, state.epochs - len(state.history))
        self.bar = tqdm(total=remaining, unit="batch", disable=None if state.rank == 0 else True)
        # Reading the running loss syncs with the device: a few times per epoch only.
        self.refresh = max(1, state.steps_per_epoch // 10)

    def transform_batch(self, state: FitState, x: Tensor) -> Tensor:
        """The training batch ``x`` (on the device) as the step should see it."""
        return x

    def on_before_optimizer_step(self, state: FitState) -> None:
        """After the gradients of a step are computed, before the optimizer uses them."""

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


def device_of(module: nn.Module, default: torch.device | str = "cpu") -> torch.device:
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


class TensorBoard(Callback):
    """Logs the training to TensorBoard through ``torch.utils.tensorboard``: every epoch's
    metrics as scalars (ELBO, reconstruction, KL, active units, learning rate, images/s),
    and, for a VAE on images, grids of samples and of inputs beside their reconstructions
    every ``images_every`` epochs. Needs the ``tensorboard`` package
    (``pip install "pyrovae[tensorboard]"``); rank 0 alone writes.

    Args:
        log_dir: the folder, or the :class:`RunDirectory` of a run being written, whose
            ``tensorboard`` folder is opened at the end of the first epoch (a staged run
            has moved by then).
        image_shape: ``(H, W)`` or ``(C, H, W)`` of the data, for image grids (grey or
            RGB); none without it.
        examples: data points whose reconstructions are drawn.
        images_every: epochs between image grids (and the first epoch).

    Raises:
        PyrovaeError: the tensorboard package is not installed.
    """

    def __init__(
        self,
        log_dir: str | Path | RunDirectory,
        image_shape: Sequence[int] = (),
        examples: Tensor | None = None,
        images_every: int = 5,
    ) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise PyrovaeError(
                'TensorBoard logging needs the tensorboard package: pip install "pyrovae[tensorboard]"'
            ) from None
        self._writer_type = SummaryWriter
        self.log_dir = log_dir
        self.image_shape = tuple(image_shape)
        self.examples = examples
        self.images_every = images_every
        self.writer: Any = None

    def on_epoch_end(self, state: FitState) -> None:
        if state.rank != 0:
            return
        if self.writer is None:
            # Opened at the first epoch's end, after a staged run has moved into place:
            # TensorBoard's writer appends to its file by path.
            log_dir = (
                self.log_dir.tensorboard if isinstance(self.log_dir, RunDirectory) else self.log_dir
            )
            self.writer = self._writer_type(log_dir=str(log_dir))
        last = state.history[-1]
        for key, value in last.items():
            if key != "epoch" and math.isfinite(value):
                self.writer.add_scalar(key.replace("_", "/", 1), value, state.epoch)
        if self._drawable() and (state.epoch == 1 or state.epoch % self.images_every == 0):
            self._images(state)
        self.writer.flush()

    def _drawable(self) -> bool:
        try:
            return image_layout(self.image_shape)[0] in (1, 3)
        except ValueError:  # feature vectors, or a shape that is not an image's
            return False

    @torch.no_grad()
    def _images(self, state: FitState) -> None:
        model, guide = state.model, state.guide
        shape = (-1, *image_layout(self.image_shape))
        if hasattr(model, "sample"):
            samples = model.sample(64).clamp(0, 1).reshape(shape)
            self.writer.add_images("samples", samples, state.epoch)
        encoder = getattr(guide, "encoder", None)
        # Reconstructions of plain data (a labelled model's decoder also reads the labels).
        plain = isinstance(self.examples, Tensor)
        if plain and encoder is not None and hasattr(model, "decode"):
            x = self.examples.to(device_of(state.loss_fn))
            if len(getattr(model, "decoder_sites", ())) > 1:
                # The decoder reads several latents (a skip stack): one draw of each from
                # the guide, decoded by the model replaying it.
                guide_trace = poutine.trace(guide).get_trace(x)
                replayed = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x)
                recon = replayed.nodes[OBSERVED]["fn"].mean.clamp(0, 1)
            else:
                q = encoder(x)
                try:
                    z = q.mean
                except (NotImplementedError, AttributeError):
                    z = q.sample()
                recon = model.decode(z).mean.clamp(0, 1)
            pairs = torch.stack([x, recon], 1).reshape(shape)
            self.writer.add_images("inputs_and_reconstructions", pairs, state.epoch)

    def on_fit_end(self, state: FitState) -> None:
        if self.writer is not None:
            self.writer.close()
