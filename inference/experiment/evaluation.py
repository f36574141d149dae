"""Evaluating a run: :func:`evaluate_run` and the :class:`Evaluation` it returns and writes.

An evaluation is written as strict JSON (NaN and infinities become null), atomically, and
never over an evaluation made with other settings unless asked: a quick ``-k 1 --limit 1``
cannot silently replace a K = 5000 result.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyro
import torch
from torch import Tensor
from tqdm.auto import tqdm

from pyrovae.inference.algorithms.annealing import (
    AnnealedLikelihood,
    annealed_log_marginal_likelihood,
)
from pyrovae.inference.algorithms.compiled import compile_wanted
from pyrovae.inference.algorithms.marginal import (
    AUTO_MIN_PAIRS,
    MarginalLikelihood,
    log_marginal_likelihood,
)
from pyrovae.inference.algorithms.psis import KHAT_THRESHOLD
from pyrovae.inference.errors import PyrovaeError, check_int
from pyrovae.inference.experiment.distributed import (
    derived_seed,
    gather_blocks,
    process_group,
    rank_and_world,
)
from pyrovae.inference.experiment.inputs import resolve_device
from pyrovae.inference.experiment.runs import (
    EVALUATION,
    Run,
    atomic_write,
    check_writable,
    load_run,
)
from pyrovae.model.labelled import Labelled, data_of
from pyrovae.model.likelihoods import Bernoulli, bits_per_dim

__all__ = [
    "METHODS",
    "SETTINGS",
    "Evaluation",
    "check_evaluation_target",
    "classification_accuracy",
    "estimate_log_px",
    "evaluate_run",
    "evaluation_settings",
]

METHODS = ("is", "ais")
"""Estimators of log p(x): importance sampling from the guide, annealed importance sampling."""

BLOCK = 100
"""Points per block of an evaluation: each block's draws are seeded by its index, so the result
is the same whether one process or many (``torchrun``) evaluate the blocks."""

SETTINGS = ("method", "split", "num_samples", "num_chains", "num_steps", "limit", "seed")
"""The settings that make two evaluations of a run the same evaluation."""


@dataclass(frozen=True)
class Evaluation:
    """The evaluation of log p(x) of a run on a data split, by importance sampling (``"is"``)
    or annealed importance sampling (``"ais"``).

    Attributes:
        run: the run directory.
        epoch: the run's epoch when evaluated.
        split: ``"train"``, ``"validation"`` or ``"test"``.
        method: ``"is"`` or ``"ais"``.
        num_samples: K, draws per point (importance sampling; None for AIS).
        num_chains: chains per point (AIS; None for importance sampling).
        num_steps: annealing steps per chain (AIS; None for importance sampling).
        limit: the first ``limit`` points of the split were evaluated (None: all).
        seed: the seed the draws started from.
        seconds: time of the estimate.
        features: data features per point, for bits/dim.
        levels: grey levels for the bits/dim of a density (None for a pmf), see
            :func:`pyrovae.model.bits_per_dim`.
        bits_undefined: why bits/dim has no meaning for these data and this likelihood
            (Bernoulli pixels on grey levels score a cross-entropy, not a probability);
            None where it has one.
        result: the per-point :class:`MarginalLikelihood` (``log_px``, ``stderr``,
            ``khat``, ``elbo``, ... each ``(N,)``) or
            :class:`~pyrovae.inference.algorithms.annealing.AnnealedLikelihood`
            (``log_px``, ``stderr``, ``acceptance``, ...).
        accuracy: for a model with a classifier q(y|x) (M2), the share of the points whose
            most probable class under it is their label; None otherwise.
    """

    run: Path
    epoch: int
    split: str
    method: str
    num_samples: int | None
    num_chains: int | None
    num_steps: int | None
    limit: int | None
    seed: int
    seconds: float
    features: int
    levels: int | None
    result: MarginalLikelihood | AnnealedLikelihood
    accuracy: float | None = None
    bits_undefined: str | None = None

    @property
    def num_points(self) -> int:
        return len(self.result.log_px)

    def summary(self) -> dict[str, float]:
        """Means over the points, the Monte Carlo error of the mean log p(x), bits/dim and the
        k̂ share (NaN when k̂ was not computed)."""
        summary = self.result.summary()
        summary["bits_per_dim"] = (
            math.nan
            if self.bits_undefined
            else float(bits_per_dim(summary["log_px"], self.features, self.levels))
        )
        if self.accuracy is not None:
            summary["accuracy"] = self.accuracy
        return summary

    def to_json(self) -> dict[str, Any]:
        """Settings, summary and per-point figures in data order, as strict JSON values
        (NaN and infinities become null)."""
        names = (
            ("log_px", "stderr", "khat", "elbo")
            if self.method == "is"
            else (
                "log_px",
                "stderr",
                "acceptance",
            )
        )
        per_point = {
            name: [_finite(v) for v in getattr(self.result, name).tolist()] for name in names
        }
        return {
            "run": str(self.run),
            "epoch": self.epoch,
            "split": self.split,
            "method": self.method,
            "points": self.num_points,
            "num_samples": self.num_samples,
            "num_chains": self.num_chains,
            "num_steps": self.num_steps,
            "limit": self.limit,
            "seed": self.seed,
            "seconds": self.seconds,
            "features": self.features,
            "bits_per_dim_levels": self.levels,
            "bits_per_dim_undefined": self.bits_undefined,
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


def check_evaluation_target(path: Path, settings: dict[str, Any], force: bool = False) -> None:
    """Refuses, before any work, an output that cannot be written or that holds an
    evaluation made with other settings (unless ``force``).

    Raises:
        PyrovaeError: one line naming the file, the settings that differ, and the way out.
    """
    check_writable(path, "evaluation")
    if path.is_dir():
        raise PyrovaeError(f"cannot write the evaluation to {path}: it is a directory")
    if not path.exists() or force:
        return
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        saved = None
    if not isinstance(saved, dict):
        raise PyrovaeError(
            f"{path} exists and is not a pyrovae evaluation; pass --force to replace it or "
            "--output FILE to write elsewhere"
        )
    differ = [
        f"{k} {saved.get(k)!r} -> {settings[k]!r}" for k in SETTINGS if saved.get(k) != settings[k]
    ]
    if differ:
        raise PyrovaeError(
            f"{path} holds an evaluation with other settings ({', '.join(differ)}); pass "
            "--force to replace it or --output FILE to keep both"
        )


def evaluation_settings(
    method: str,
    split: str,
    num_samples: int,
    num_chains: int,
    num_steps: int,
    limit: int | None,
    seed: int,
) -> dict[str, Any]:
    """The settings an evaluation is identified by, with those of the other method None."""
    if method not in METHODS:
        raise PyrovaeError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    ais = method == "ais"
    return {
        "method": method,
        "split": split,
        "num_samples": None if ais else num_samples,
        "num_chains": num_chains if ais else None,
        "num_steps": num_steps if ais else None,
        "limit": limit,
        "seed": seed,
    }


def classification_accuracy(
    run: Run, split: str = "test", limit: int | None = None
) -> tuple[float, int] | None:
    """The accuracy of q(y|x) on the first ``limit`` points of a split (every point without
    a limit), and the number of points, for a run whose guide has a ``classifier`` (M2);
    None for other runs or data without labels. Cheap beside ``evaluate_run``: one pass of
    the classifier, no sampling.
    """
    x, labels = run.points(split, limit)
    accuracy = _accuracy(run, x, labels)
    return None if accuracy is None else (accuracy, len(x))


def _accuracy(run: Run, rows: Tensor | Labelled, labels: Tensor | None) -> float | None:
    """The classifier's accuracy on the points, for a guide with a ``classifier`` (M2)."""
    classifier = getattr(run.guide, "classifier", None)
    if classifier is None or labels is None or not len(labels):
        return None
    x = data_of(rows)
    with torch.no_grad():
        guess = torch.cat([classifier(part).probs.argmax(-1) for part in x.split(1000)])
    return (guess == labels).double().mean().item()


def evaluate_run(
    run: Run | str | Path,
    *,
    split: str = "test",
    method: str = "is",
    num_samples: int = 5000,
    num_chains: int = 16,
    num_steps: int = 500,
    limit: int | None = None,
    seed: int = 0,
    device: str | None = None,
    output: str | Path | None = None,
    force: bool = False,
    write: bool = True,
    progress: bool = False,
) -> Evaluation:
    """Estimates log p(x) per data point of a run's split.

    Args:
        run: a :class:`Run` or a run directory.
        split: ``"test"``, ``"validation"`` or ``"train"`` (binarized once with a fixed seed
            where the run binarizes).
        method: ``"is"``, importance sampling from the guide
            (:func:`~pyrovae.inference.log_marginal_likelihood`), or ``"ais"``, annealed
            importance sampling with HMC
            (:func:`~pyrovae.inference.annealed_log_marginal_likelihood`).
        num_samples: K, draws from the guide per point (``"is"``).
        num_chains: chains per point (``"ais"``).
        num_steps: annealing steps per chain (``"ais"``).
        limit: only the first ``limit`` points.
        seed: seeds the draws.
        device: default the run's ``train.device``.
        output: where to write the JSON; default ``RUN/evaluation.json``.
        force: replace an evaluation made there with other settings.
        write: write the JSON (checked before the work starts); False leaves it to the
            caller's :meth:`Evaluation.write`.
        progress: show a progress bar over the data points.

    Returns:
        The :class:`Evaluation`.

    Raises:
        PyrovaeError: bad settings or output, or a model the estimator cannot score, found
            before the work starts where possible.
    """
    for name, value in (
        ("num_samples", num_samples),
        ("num_chains", num_chains),
        ("num_steps", num_steps),
        ("limit", 1 if limit is None else limit),
    ):
        check_int(value, name, error=PyrovaeError)
    settings = evaluation_settings(method, split, num_samples, num_chains, num_steps, limit, seed)
    run = run if isinstance(run, Run) else load_run(run)
    target = Path(output) if output is not None else run.output(EVALUATION)
    if write:
        check_evaluation_target(target, settings, force)
    x, labels = run.points(split, limit)
    likelihood = getattr(run.model, "likelihood", None)
    accuracy = _accuracy(run, x, labels)

    start = time.perf_counter()
    with process_group(resolve_device(device or run.spec.train.device)) as device_:
        run.model.to(device_)
        run.guide.to(device_)
        result = estimate_log_px(
            run.model,
            run.guide,
            x.to(device_),
            method=method,
            num_samples=num_samples,
            num_chains=num_chains,
            num_steps=num_steps,
            seed=seed,
            progress=progress,
        )
        writes = rank_and_world()[0] == 0
    evaluation = Evaluation(
        run=run.path,
        epoch=run.epoch,
        split=split,
        method=method,
        num_samples=settings["num_samples"],
        num_chains=settings["num_chains"],
        num_steps=settings["num_steps"],
        limit=limit,
        seed=seed,
        seconds=time.perf_counter() - start,
        features=data_of(x)[0].numel(),
        # A density on [0, 1] data is reported on the scale of 256 grey levels; a pmf, or a
        # model without a likelihood module, as it is.
        levels=256
        if likelihood is not None and not getattr(likelihood, "discrete", False)
        else None,
        result=result,
        accuracy=accuracy,
        bits_undefined=_bits_undefined(likelihood, x),
    )
    if write and writes:
        evaluation.write(target)
    return evaluation


def _bits_undefined(likelihood: Any, x: Tensor | Labelled) -> str | None:
    """Why bits/dim means nothing here, or None: Bernoulli pixels on values other than 0 and
    1 give the binary cross-entropy, which is not the log of a probability."""
    if not isinstance(likelihood, Bernoulli):
        return None
    data = data_of(x)[0]
    if bool(((data == 0) | (data == 1)).all()):
        return None
    return (
        "Bernoulli pixels on grey levels score a cross-entropy, not a probability; "
        'binarize the data (data.binarize = "dynamic" or "static") or use a likelihood '
        "for grey levels"
    )


def estimate_log_px(
    model: Any,
    guide: Any,
    x: Tensor,
    *,
    method: str = "is",
    num_samples: int = 5000,
    num_chains: int = 16,
    num_steps: int = 500,
    seed: int = 0,
    progress: bool = False,
) -> MarginalLikelihood | AnnealedLikelihood:
    """Per-point log p(x) of ``x``: the one estimate that ``evaluate``, ``compare`` and the
    report print, so that they agree for the same run, K, seed and points.

    The points go in blocks of :data:`BLOCK`; block ``i`` draws after
    ``pyro.set_rng_seed(derived_seed(seed, i))``, so the result does not depend on how many
    processes share the blocks (under ``torchrun`` each rank takes every world-th block and
    all ranks get every result).

    Args:
        model: the Pyro model.
        guide: the guide.
        x: the points, on the programs' device.
        method: ``"is"`` (importance sampling from the guide) or ``"ais"``.
        num_samples: K, draws per point (``"is"``).
        num_chains: chains per point (``"ais"``).
        num_steps: annealing steps per chain (``"ais"``).
        seed: the seed of block 0.
        progress: show a progress bar over the blocks.

    Raises:
        PyrovaeError: a model or guide the estimator cannot score.
    """
    if method not in METHODS:
        raise PyrovaeError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    # The passes of all blocks are traced and compiled once when the whole estimate is large.
    compile = compile_wanted("auto", len(x) * num_samples, AUTO_MIN_PAIRS)

    def estimate(index: int, block: Tensor) -> MarginalLikelihood | AnnealedLikelihood:
        if method == "is":
            return log_marginal_likelihood(
                model, guide, block, num_samples=num_samples, compile=compile
            )
        return annealed_log_marginal_likelihood(model, guide, block, num_chains, num_steps)

    blocks = list(x.split(BLOCK))
    bar = tqdm(total=len(blocks), unit="block", disable=None if progress else True)

    def seed_block(index: int) -> None:
        pyro.set_rng_seed(derived_seed(seed, index))
        bar.update()

    try:
        with bar:
            return _concatenate(gather_blocks(blocks, estimate, seed_block))
    except ValueError as e:
        raise PyrovaeError(str(e)) from None


def _concatenate(results: list[Any]) -> Any:
    """Per-block results joined into one, point fields concatenated in block order."""
    first = results[0]
    values = {}
    for f in dataclasses.fields(first):
        parts = [getattr(r, f.name) for r in results]
        if isinstance(parts[0], Tensor):
            values[f.name] = torch.cat(parts)
        elif isinstance(parts[0], dict):
            values[f.name] = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        else:
            values[f.name] = parts[0]
    return type(first)(**values)


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None
