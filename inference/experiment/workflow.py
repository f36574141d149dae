"""The library's entry points for whole runs: :func:`train_run` and :func:`evaluate_run`.

Everything the ``pyrovae`` command does beyond parsing and printing lives here, so that a
Python program, a notebook or a benchmark gets exactly what the command line gets.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyro
import torch
from pyrovae.inference.algorithms.marginal import MarginalLikelihood, log_marginal_likelihood
from pyrovae.inference.algorithms.psis import KHAT_THRESHOLD
from pyrovae.inference.errors import PyrovaeError
from pyrovae.inference.experiment.callbacks import Callback, Checkpointing
from pyrovae.inference.experiment.data import Splits, load_data
from pyrovae.inference.experiment.runs import (
    SPEC,
    Checkpoint,
    Run,
    atomic_write,
    create_run,
    load_run,
)
from pyrovae.inference.experiment.spec import (
    Spec,
    build,
    build_objective,
    build_schedule,
    load_spec,
    with_overrides,
)
from pyrovae.inference.experiment.training import check_inputs, fit, resolve_device
from pyrovae.model.likelihoods import bits_per_dim

__all__ = ["EVALUATION", "Evaluation", "evaluate_run", "load_run_data", "train_run"]

EVALUATION = "evaluation.json"
"""Where :func:`evaluate_run` writes its results in the run directory by default."""

_RESUMABLE = ("train.epochs", "train.device")
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
        >>> run = train_run("configs/mnist-standard-diagonal.toml", "runs/m",
        ...                 overrides=["train.epochs=2"])  # doctest: +SKIP
    """
    overrides = list(overrides)
    if resume:
        if out is None:
            raise PyrovaeError("resume needs the run directory to continue (out)")
        if spec is not None or force:
            raise PyrovaeError("resume takes the spec from the run; drop the spec and force")
        out = Path(out)
        if not out.is_dir():
            raise PyrovaeError(f"run directory {out} does not exist; nothing to resume")
        if Checkpoint.load(out) is None:
            raise PyrovaeError(f"{out} has no checkpoint to resume; train it afresh instead")
        other = [o for o in overrides if o.partition("=")[0].strip() not in _RESUMABLE]
        if other:
            raise PyrovaeError(
                f"a resumed run keeps its spec; only {', '.join(_RESUMABLE)} may change, "
                f"not {other[0]!r}"
            )
        resolved = with_overrides(load_spec(out / SPEC), overrides)
    else:
        resolved = (
            with_overrides(spec, overrides)
            if isinstance(spec, Spec)
            else load_spec(spec, overrides)
        )
        if out is None:
            stem = Path(spec).stem if isinstance(spec, str | Path) else "default"
            out = Path("runs") / stem
        out = Path(out)
    if device is not None:
        resolved = resolved.replace(train={"device": device})
    train = resolved.train
    device_ = resolve_device(train.device)
    data = load_run_data(resolved)
    pyro.set_rng_seed(train.seed)
    model, guide = build(resolved, data.features, data.image_shape)
    objective = build_objective(resolved)
    schedule = build_schedule(resolved)
    check_inputs(model, data.train, data.validation)
    if resume:
        atomic_write(out / SPEC, resolved.to_toml().encode())
    else:
        create_run(out, resolved, force=force)
    checkpointing = Checkpointing(
        out,
        features=data.features,
        image_shape=data.image_shape or (),
        spec=resolved.to_toml(),
    )
    fit(
        model,
        guide,
        data.train,
        validation=data.validation,
        objective=objective,
        kl_schedule=schedule,
        epochs=train.epochs,
        batch_size=train.batch_size,
        lr=train.lr,
        grad_clip=train.grad_clip,
        patience=train.patience,
        transform=torch.bernoulli if data.dynamic else None,
        device=device_,
        seed=train.seed,
        callbacks=[checkpointing, *callbacks],
        progress=progress,
    )
    if checkpointing.latest is None:
        raise PyrovaeError(f"{out}: no epoch was trained")
    model.eval()
    guide.eval()
    return Run(out, resolved, model, guide, checkpointing.latest)


def load_run_data(spec: Spec) -> Splits:
    """The data set a spec names, split and binarized as training saw it."""
    d = spec.data
    return load_data(d.name, d.binarize, d.path, d.validation_size)


@dataclass(frozen=True)
class Evaluation:
    """The importance-sampling evaluation of a run on a data split.

    Attributes:
        run: the run directory.
        epoch: the run's epoch when evaluated.
        split: ``"train"``, ``"validation"`` or ``"test"``.
        num_samples: K, draws per point.
        seed: the seed the draws started from.
        seconds: time of the estimate.
        features: data features per point, for bits/dim.
        levels: grey levels for the bits/dim of a density (None for a pmf), see
            :func:`pyrovae.model.bits_per_dim`.
        result: the per-point :class:`MarginalLikelihood` (``log_px``, ``stderr``,
            ``khat``, ``elbo``, ... each ``(N,)``).
    """

    run: Path
    epoch: int
    split: str
    num_samples: int
    seed: int
    seconds: float
    features: int
    levels: int | None
    result: MarginalLikelihood

    @property
    def num_points(self) -> int:
        return len(self.result.log_px)

    def summary(self) -> dict[str, float]:
        """Means over the points, the Monte Carlo error of the mean log p(x), bits/dim and the
        k̂ share (NaN when k̂ was not computed)."""
        summary = self.result.summary()
        summary["bits_per_dim"] = float(bits_per_dim(summary["log_px"], self.features, self.levels))
        return summary

    def to_json(self) -> dict[str, Any]:
        """Settings, summary and per-point figures in data order, as strict JSON values
        (NaN and infinities become null)."""
        per_point = {
            name: [_finite(v) for v in getattr(self.result, name).tolist()]
            for name in ("log_px", "stderr", "khat", "elbo")
        }
        return {
            "run": str(self.run),
            "epoch": self.epoch,
            "split": self.split,
            "points": self.num_points,
            "num_samples": self.num_samples,
            "seed": self.seed,
            "seconds": self.seconds,
            "features": self.features,
            "bits_per_dim_levels": self.levels,
            "khat_threshold": KHAT_THRESHOLD,
            **{k: _finite(v) for k, v in self.summary().items()},
            "per_point": per_point,
        }

    def write(self, path: str | Path) -> Path:
        """Writes :meth:`to_json` to ``path`` atomically."""
        path = Path(path)
        text = json.dumps(self.to_json(), indent=2, allow_nan=False) + "\n"
        atomic_write(path, text.encode())
        return path


def evaluate_run(
    run: Run | str | Path,
    *,
    split: str = "test",
    num_samples: int = 5000,
    limit: int | None = None,
    seed: int = 0,
    device: str | None = None,
    output: str | Path | None = None,
) -> Evaluation:
    """Estimates log p(x) per data point of a run's split by importance sampling.

    Args:
        run: a :class:`Run` or a run directory.
        split: ``"test"``, ``"validation"`` or ``"train"`` (binarized once with a fixed seed
            where the run binarizes).
        num_samples: K, draws from the guide per point.
        limit: only the first ``limit`` points.
        seed: seeds the draws.
        device: default the run's ``train.device``.
        output: where to write the JSON; default ``RUN/evaluation.json``.

    Returns:
        The :class:`Evaluation`, also written as JSON.

    Raises:
        PyrovaeError: bad settings, or a model the estimator cannot score.
    """
    if isinstance(num_samples, bool) or int(num_samples) != num_samples or num_samples < 1:
        raise PyrovaeError(f"num_samples must be at least 1, got {num_samples}")
    if limit is not None and limit < 1:
        raise PyrovaeError(f"limit must be at least 1, got {limit}")
    run = run if isinstance(run, Run) else load_run(run)
    device_ = resolve_device(device or run.spec.train.device)
    x, _ = load_run_data(run.spec).split(split)
    x = x[:limit].to(device_)
    run.model.to(device_)
    run.guide.to(device_)
    pyro.set_rng_seed(seed)
    start = time.perf_counter()
    try:
        result = log_marginal_likelihood(run.model, run.guide, x, num_samples=num_samples)
    except ValueError as e:
        raise PyrovaeError(str(e)) from None
    likelihood = getattr(run.model, "likelihood", None)
    evaluation = Evaluation(
        run=run.path,
        epoch=run.epoch,
        split=split,
        num_samples=num_samples,
        seed=seed,
        seconds=time.perf_counter() - start,
        features=x[0].numel(),
        # A density on [0, 1] data is reported on the scale of 256 grey levels; a pmf, or a
        # model without a likelihood module, as it is.
        levels=256
        if likelihood is not None and not getattr(likelihood, "discrete", False)
        else None,
        result=result,
    )
    evaluation.write(output if output is not None else run.path / EVALUATION)
    return evaluation


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None
