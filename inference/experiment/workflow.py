"""The library's entry points for whole runs: :func:`train_run` and :func:`evaluate_run`.

Everything the ``pyrovae`` command does beyond parsing and printing lives here, so that a
Python program, a notebook or a benchmark gets exactly what the command line gets.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pyro
import torch
from torch import nn

from pyrovae.inference.errors import DiskFull, Interrupted, PyrovaeError
from pyrovae.inference.experiment.build import (
    build,
    build_lr_schedule,
    build_objective,
    build_optimizer,
    build_schedule,
)
from pyrovae.inference.experiment.callbacks import (
    BatchTransform,
    Callback,
    Checkpointing,
    CollapseAlarm,
    DivergenceAlarm,
    EarlyStopping,
    FitState,
    GradientClipping,
    ProgressBar,
    TensorBoard,
)
from pyrovae.inference.experiment.data import Splits, check_data
from pyrovae.inference.experiment.distributed import process_group, rank_and_world
from pyrovae.inference.experiment.inputs import check_inputs, resolve_device
from pyrovae.inference.experiment.runs import (
    CHECKPOINT,
    SPEC,
    Checkpoint,
    Run,
    RunDirectory,
    atomic_write,
    check_fingerprint,
    check_replaceable,
    check_writable,
    load_run,
    load_run_data,
    remove_stale_stages,
    run_lock,
    stage_run,
)
from pyrovae.inference.experiment.spec import Spec, load_spec, with_overrides
from pyrovae.inference.experiment.training import TrainingDiverged, fit
from pyrovae.inference.experiment.validation import monitored
from pyrovae.inference.experiment.warmup import GuideWarmup, check_warmup
from pyrovae.model.labelled import Labelled

__all__ = ["train_run"]

LOGS = ("none", "tensorboard")
"""Values of ``train.log``: where training is logged besides ``metrics.csv``."""

_RESUMABLE = ("train.epochs", "train.device", "train.log", "train.compile")
"""The only keys a resumed run may change: the model and its data stay what they were."""


def train_run(
    spec: Spec | str | Path | None = None,
    out: str | Path | None = None,
    *,
    overrides: Iterable[str] = (),
    resume: bool = False,
    force: bool = False,
    device: str | None = None,
    progress: bool = True,
    callbacks: Sequence[Callback] = (),
) -> Run:
    """Trains the run a spec describes into a run directory, or continues one.

    Loads the data, seeds, builds model and guide, creates the run directory (``spec.toml``)
    and trains with a checkpoint after every epoch (``checkpoint.pt``, ``metrics.csv``).

    Args:
        spec: a :class:`Spec`, a TOML file, or None for the default spec (digits).
        out: the run directory; default ``runs/<spec file stem>`` or ``runs/default``. With
            ``resume``, the run to continue.
        overrides: ``"key=value"`` strings as ``pyrovae train --set`` takes them; on resume
            only ``train.epochs`` (the new total) and ``train.device``.
        resume: continue the run in ``out`` from its last checkpoint.
        force: replace an existing run directory.
        device: ``auto``, ``cpu``, ``cuda``...; default the spec's ``train.device``.
        progress: show a progress bar.
        callbacks: more :class:`~pyrovae.inference.experiment.training.Callback` objects,
            called after the run's own checkpointing.

    Returns:
        The trained :class:`Run`, its model and guide in memory, in eval mode.

    Raises:
        PyrovaeError: bad spec, data, settings or directory, before anything is written.

    Example:
        >>> import tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> overrides = ["train.epochs=1", "data.limit=100"]  # the default spec: digits
        >>> run = train_run(None, f"{tmp.name}/run", overrides=overrides, progress=False)
        >>> run.checkpoint.epoch, (run.path / "checkpoint.pt").is_file()
        (1, True)
        >>> tmp.cleanup()
    """
    overrides = list(overrides)
    if resume:
        out, resolved, done = _resumed_spec(spec, out, overrides, force)
    else:
        resolved = (
            with_overrides(spec, overrides)
            if isinstance(spec, Spec)
            else load_spec(spec, overrides)
        )
        if out is None:
            out = Path("runs") / (Path(spec).stem if isinstance(spec, str | Path) else "default")
        out, done = Path(out), 0
        if out.exists() and not force:
            raise PyrovaeError(
                f"run directory {out} already exists; pass --force to replace it, "
                f"--resume {out} to continue it, or --out to choose another"
            )
    if device is not None:
        resolved = resolved.replace(train={"device": device})
    train = resolved.train
    if train.epochs <= done:
        raise PyrovaeError(
            f"{out} has already trained {done} epoch(s); train.epochs (--epochs) is the total, "
            f"so ask for more than {done}"
        )
    if train.log not in LOGS:
        raise PyrovaeError(f"unknown train.log {train.log!r}; valid: {', '.join(LOGS)}")
    if train.log == "tensorboard":
        TensorBoard(".")  # fails now, with how to install it, if tensorboard is missing
    device_ = resolve_device(train.device)
    # Holds the run's lock from the moment it is first written to the end of training.
    held = contextlib.ExitStack()
    with held, process_group(device_) as device_:
        # Everything is checked before anything on disk changes: data, model, one probe step.
        # A resumed run of an image folder reads the images it was trained on (images.json).
        data = load_run_data(resolved, out if resume else None)
        recorded_path = resolved.data.path
        if data.source is not None:
            resolved = resolved.replace(data={"path": str(data.source)})
        pyro.set_rng_seed(train.seed)
        model, guide = build(resolved, data.features, data.image_shape)
        objective = build_objective(resolved)
        schedule = build_schedule(resolved)
        optimizer = build_optimizer(resolved, nn.ModuleList([model, guide]).parameters())
        lr_scheduler = build_lr_schedule(resolved, optimizer)
        check_inputs(model, data.train, data.validation)
        check_data(
            data.test, "test data", getattr(getattr(model, "likelihood", None), "support", None)
        )
        check_warmup(guide, train.guide_warmup)
        _probe_step(model, guide, objective, schedule, data, train.batch_size)
        # Rank 0 alone writes the run; the other ranks of a distributed run only train.
        writes = rank_and_world()[0] == 0
        if resume:
            check_writable(out / SPEC, "run")
            if writes:
                held.enter_context(run_lock(out))
            staging = None
        else:
            if out.exists():
                check_replaceable(
                    out, keep=[p for p in (spec, data.source) if isinstance(p, Path | str)]
                )
            check_writable(out, "run directory", create=True)
            if writes:
                out.parent.mkdir(parents=True, exist_ok=True)  # where the run is staged
                held.enter_context(run_lock(out))
                if out.exists() and not force:  # made by another process since the check
                    raise PyrovaeError(
                        f"run directory {out} already exists; pass --force to replace it, "
                        f"--resume {out} to continue it, or --out to choose another"
                    )
                remove_stale_stages(out)
            staging = stage_run(out, resolved, data.listing) if writes else None

        fingerprint = data.fingerprint()
        if resume:
            recorded = Checkpoint.load(out).data_sha256
            if recorded is not None:
                check_fingerprint(data, recorded, out, recorded_path, fingerprint)
        directory = RunDirectory(staging or out, out)
        checkpointing = Checkpointing(
            directory,
            features=data.features,
            image_shape=data.image_shape or (),
            spec=resolved.to_toml(),
            data_sha256=fingerprint,
            best=monitored(objective) if train.patience is not None else None,
        )
        own = [checkpointing, _Promote(directory)]
        if train.guide_warmup:
            own.append(GuideWarmup(train.guide_warmup))
        if train.patience is not None:
            own.append(EarlyStopping(train.patience, monitor=monitored(objective)))
        if train.grad_clip is not None:
            own.append(GradientClipping(train.grad_clip))
        if data.dynamic:
            own.append(BatchTransform(torch.bernoulli))
        own.append(CollapseAlarm())
        own.append(DivergenceAlarm())
        if train.log == "tensorboard":
            own.append(
                TensorBoard(
                    directory,
                    image_shape=data.image_shape or (),
                    examples=data.validation[:32],
                )
            )
        try:
            if writes and resume and (out / SPEC).read_text() != resolved.to_toml():
                atomic_write(out / SPEC, resolved.to_toml().encode())
            model.to(device_)
            guide.to(device_)
            pyro.set_rng_seed(train.seed)
            fit(
                model,
                guide,
                data.train,
                validation=data.validation,
                objective=objective,
                kl_schedule=schedule,
                epochs=train.epochs,
                batch_size=train.batch_size,
                optimizer=optimizer,
                lr_scheduler=lr_scheduler,
                callbacks=[*own, *callbacks, *([ProgressBar()] if progress else [])],
                compile=train.compile,
            )
        except (KeyboardInterrupt, TrainingDiverged, DiskFull) as e:
            what = "interrupted" if isinstance(e, KeyboardInterrupt) else str(e).split(";")[0]
            raise _stopped(what, e, out, checkpointing, resume) from None
        finally:
            if staging is not None and staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        model.eval()
        guide.eval()
        return Run(out, resolved, model, guide, checkpointing.latest)


class _Promote(Callback):
    """Moves a staged run to its place once its first checkpoint exists (replacing the run
    that was there); the callbacks writing into the run share its :class:`RunDirectory`."""

    def __init__(self, directory: RunDirectory) -> None:
        self.directory = directory

    def on_epoch_end(self, state: FitState) -> None:
        if self.directory.staged and (self.directory.path / CHECKPOINT).is_file():
            self.directory.promote()


def _resumed_spec(
    spec: Any, out: str | Path | None, overrides: list[str], force: bool
) -> tuple[Path, Spec, int]:
    """The run to continue, its spec with the allowed overrides, and its finished epochs."""
    if out is None:
        raise PyrovaeError("resume needs the run directory to continue (out)")
    if spec is not None or force:
        raise PyrovaeError("resume takes the spec from the run; drop the spec and force")
    out = Path(out)
    if not out.is_dir():
        raise PyrovaeError(f"run directory {out} does not exist; nothing to resume")
    checkpoint = Checkpoint.load(out)
    if checkpoint is None:
        raise PyrovaeError(f"{out} has no checkpoint to resume; train it afresh instead")
    other = [o for o in overrides if o.partition("=")[0].strip() not in _RESUMABLE]
    if other:
        raise PyrovaeError(
            f"a resumed run keeps its spec; only {', '.join(_RESUMABLE)} may change, "
            f"not {other[0]!r}"
        )
    return out, with_overrides(load_run(out).spec, overrides), checkpoint.epoch


def _probe_step(
    model: Any, guide: Any, objective: Any, schedule: Any, data: Splits, batch_size: int
) -> None:
    """One loss and backward pass on a few training points, without an optimizer step, so
    that a model that cannot train on these data fails before any file is touched."""
    x = data.train[: min(batch_size, 8)]
    if data.dynamic:
        x = x.map(torch.bernoulli) if isinstance(x, Labelled) else torch.bernoulli(x)
    try:
        with pyro.validation_enabled(False), schedule.handler(0):
            loss = objective(model, guide)(x)
        loss.backward()
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise PyrovaeError(f"the model cannot be trained on these data: {reason}") from None
    for module in (model, guide):
        module.zero_grad(set_to_none=True)


def _stopped(
    what: str, error: BaseException, out: Path, checkpointing: Checkpointing, resume: bool
) -> PyrovaeError:
    """The one line that says where a stopped training left the run."""
    latest = checkpointing.latest
    if latest is not None and (resume or checkpointing.run_dir == out):
        kept = f"the checkpoint of epoch {latest.epoch} in {out} is kept"
    elif out.exists():
        kept = f"no epoch finished, so {out} is unchanged"
    else:
        kept = f"no epoch finished, so nothing was written to {out}"
    if isinstance(error, KeyboardInterrupt):
        return Interrupted(f"{what}; {kept}")
    if isinstance(error, DiskFull):
        return DiskFull(f"{what}; {kept}; free some space and continue with --resume {out}")
    return TrainingDiverged(f"{what}; {kept}; lower train.lr or set train.grad_clip")
