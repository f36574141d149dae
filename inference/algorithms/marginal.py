"""Importance-sampling estimates of log p(x), one per data point, with their diagnostics.

For each row x of the data, K draws z_k ~ q(z|x) from the guide give log weights
``log w_k = log p(x, z_k) - log q(z_k|x)`` and the estimate
``log p̂(x) = logsumexp_k(log w_k) - log K`` (Burda et al., 2016). The model and guide are any
Pyro programs whose sample sites sit in the data plate (``model.sites.DATA_PLATE``); particles
are vectorized in an outer plate, so one pass scores a whole chunk of (particle, point) pairs.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyro
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from pyrovae.inference.algorithms.compiled import NotCompilable, TracedProgram, compile_wanted
from pyrovae.inference.algorithms.psis import (
    FLAT_ULPS,
    KHAT_THRESHOLD,
    khat_bad_fraction,
    pareto_khat,
)
from pyrovae.inference.algorithms.scoring import (
    MAX_PLATE_NESTING,
    Scores,
    SiteError,
    check_sites,
    score,
)
from pyrovae.inference.errors import check_int
from pyrovae.model.labelled import Labelled, data_of

if TYPE_CHECKING:
    import xarray as xr

__all__ = [
    "AUTO_MIN_PAIRS",
    "DEFAULT_MAX_MEMORY",
    "DEFAULT_MAX_MEMORY_ACCELERATOR",
    "KHAT_THRESHOLD",
    "MarginalLikelihood",
    "log_marginal_likelihood",
    "pareto_khat",
]

DEFAULT_MAX_MEMORY = 64 * 2**20
"""Default budget in bytes on the CPU, where passes that stay small enough for the caches and
the allocator's free lists are fastest."""

DEFAULT_MAX_MEMORY_ACCELERATOR = 2**30
"""Default budget in bytes on a GPU, where larger passes amortize kernel launches."""


# Tensors a pass allocates beyond the sites' own values: decoder activations, the likelihood's
# elementwise terms. Calibrated on the MNIST VAE in benchmarks/eval_throughput.py.
_WORKSPACE_FACTOR = 4
# Bytes per stored float64 log weight, with the temporaries of the per-point statistics.
_BYTES_PER_LOG_WEIGHT = 32

_POINT_FIELDS = ("log_px", "stderr", "ess", "khat", "elbo", "reconstruction", "kl")

Program = Callable[..., Any]


def standard_error(values: Tensor) -> float:
    """The standard error of the mean of ``values`` over their first dimension (the data
    points): their sample standard deviation (n − 1 in the denominator) over sqrt(n). NaN for
    fewer than two values, where the spread is unknown. Paired comparisons pass the per-point
    differences."""
    n = len(values)
    return (values.std() / math.sqrt(n)).item() if n > 1 else math.nan


@dataclass(frozen=True)
class MarginalLikelihood:
    """Per-point importance-sampling estimates; every tensor is float64 on the CPU.

    Attributes:
        log_px: ``(N,)`` the estimate log p̂(x) = logsumexp_k(log w_k) - log K.
        stderr: ``(N,)`` Monte Carlo standard error of ``log_px`` (delta method:
            sd(w) / (mean(w) sqrt(K)); NaN for K = 1).
        ess: ``(N,)`` effective sample size 1 / sum_k w̃_k² of the normalized weights.
        khat: ``(N,)`` PSIS Pareto k̂ of the weights (:func:`pareto_khat`, ArviZ's fit);
            above 0.7 the estimate is unreliable. 0 where all weights are equal (an exact guide), NaN where K < 25.
        elbo: ``(N,)`` mean log weight, the ELBO estimate (= ``reconstruction - kl``).
        reconstruction: ``(N,)`` mean over draws of the observed sites' log p(x|z).
        kl: ``(N,)`` mean over draws of log q(z|x) - log p(z), over all latent sites.
        iwae: IWAE bound per number of samples k: ``{k: (N,)}``, each the average over
            K // k disjoint groups of the same draws; ``iwae[1]`` is the ELBO and
            ``iwae[K]`` is ``log_px``.
        num_samples: K, the number of draws per data point.
        log_weights: ``(N, K)`` the raw log weights, kept only with
            ``return_log_weights=True``.
    """

    log_px: Tensor
    stderr: Tensor
    ess: Tensor
    khat: Tensor
    elbo: Tensor
    reconstruction: Tensor
    kl: Tensor
    iwae: dict[int, Tensor]
    num_samples: int
    log_weights: Tensor | None = None

    def summary(self) -> dict[str, float]:
        """Dataset-level figures: means over points, and the k̂ diagnostics.

        ``log_px_mc_error`` is the Monte Carlo error of the mean (the estimator's own error;
        the spread of the data points is not included), ``log_px_se`` the standard error of
        the mean over the points (their spread, sd / sqrt(N)); ``khat_bad_fraction`` is the share of points with k̂ > 0.7.
        """
        n = len(self.log_px)
        # Per-point Monte Carlo errors do not average into the error of the mean: that is
        # log_px_mc_error; "stderr" stays a per-point field.
        out = {
            name: getattr(self, name).mean().item() for name in _POINT_FIELDS if name != "stderr"
        }
        out["log_px_mc_error"] = self.stderr.square().sum().sqrt().item() / n
        out["log_px_se"] = standard_error(self.log_px)
        out["khat"] = self.khat.nanmean().item()
        out["khat_max"] = self.khat.nan_to_num(nan=-math.inf).max().item()
        out["khat_bad_fraction"] = khat_bad_fraction(self.khat)
        out.update({f"iwae_{k}": v.mean().item() for k, v in self.iwae.items()})
        return out

    def to_dataset(self) -> xr.Dataset:
        """The result as an ``xarray.Dataset`` (the layout ArviZ groups hold).

        Variables over dimension ``point``, ``iwae`` over ``(point, k)`` and, when kept,
        ``log_weights`` over ``(point, sample)``, which ``arviz.psislw`` accepts as is.
        """
        import xarray as xr  # deferred: only exports need it

        data = {name: ("point", getattr(self, name).numpy()) for name in _POINT_FIELDS}
        data["iwae"] = (("point", "k"), torch.stack(list(self.iwae.values()), -1).numpy())
        if self.log_weights is not None:
            data["log_weights"] = (("point", "sample"), self.log_weights.numpy())
        coords = {"point": np.arange(len(self.log_px)), "k": list(self.iwae)}
        return xr.Dataset(data, coords=coords, attrs={"num_samples": self.num_samples})


def log_marginal_likelihood(
    model: Program,
    guide: Program,
    x: Tensor,
    num_samples: int = 5000,
    *,
    chunk_size: int | None = None,
    batch_size: int | None = None,
    max_memory: int | None = None,
    bounds: Sequence[int] | None = None,
    max_plate_nesting: int = MAX_PLATE_NESTING,
    return_log_weights: bool = False,
    progress: bool = False,
    compile: str | bool = "auto",
) -> MarginalLikelihood:
    """Estimates log p(x) for every row of ``x`` by importance sampling from the guide.

    Data are processed in blocks of ``batch_size`` points, each scored with all K draws in
    vectorized passes of ``chunk_size`` particles before the next block; the per-point
    statistics are computed on groups of blocks whose float64 log weights fit the budget.
    Memory stays bounded whatever K and N are. Runs without gradients or distribution
    validation after checking the inputs once. Scales (``poutine.scale``, beta) are
    ignored: the estimate is of the unscaled model. Modules keep their train/eval mode.

    Args:
        model: a Pyro model ``model(x)``; every sample site in the data plate.
        guide: a Pyro guide ``guide(x)`` with a site for each latent site of the model.
        x: data of shape ``(N, *features)``, rows indexed by the data plate.
        num_samples: K, draws of z per data point.
        chunk_size: particles per vectorized pass; derived from ``max_memory`` if None.
        batch_size: data points per block; derived from ``max_memory`` if None.
        max_memory: approximate budget in bytes for the tensors of one pass, and for the
            log weights of one group; default :data:`DEFAULT_MAX_MEMORY` on the CPU and
            :data:`DEFAULT_MAX_MEMORY_ACCELERATOR` elsewhere.
        bounds: the k of the IWAE bounds to report; default 1, 10, 100, ... and K.
        max_plate_nesting: plates the model and guide nest; particles go in the next dim.
        return_log_weights: keep the ``(N, K)`` log weights in the result.
        progress: show a progress bar over the points (only on a terminal).
        compile: ``"auto"``, ``"on"`` or ``"off"`` (or a bool): score the passes through a
            traced tensor program (:class:`~pyrovae.inference.algorithms.compiled.TracedProgram`,
            checked against Pyro's scoring before use, the main pass shape compiled by
            ``torch.compile``). ``"auto"`` does so for estimates of at least
            :data:`AUTO_MIN_PAIRS` (point, draw) pairs.

    Returns:
        A :class:`MarginalLikelihood` of per-point tensors.

    Raises:
        ValueError: for K < 1, empty or misshaped data, a model without observed sites, a
            guide that misses a latent site, or a site outside the data plate.

    References:
        Importance Weighted Autoencoders (Burda, Grosse and Salakhutdinov, 2016);
        Pareto Smoothed Importance Sampling (Vehtari et al., 2024).

    Example:
        >>> import torch
        >>> from pyrovae.guides import AmortizedGuide, DiagonalNormal
        >>> from pyrovae.model import VAE, Gaussian, StandardNormal
        >>> vae = VAE(StandardNormal(2), torch.nn.Linear(2, 5), Gaussian(scale=0.5))
        >>> guide = AmortizedGuide(DiagonalNormal(5, 2))
        >>> result = log_marginal_likelihood(vae, guide, torch.randn(3, 5), num_samples=100)
        >>> result.log_px.shape, sorted(result.iwae)
        (torch.Size([3]), [1, 10, 100])
        >>> bool((result.log_px >= result.elbo).all())  # log-mean-exp >= mean of the same draws
        True
    """
    _check_arguments(x, num_samples, chunk_size, batch_size, max_memory, max_plate_nesting)
    x = like_parameters(x, model, guide)
    if max_memory is None:
        cpu = x.device.type == "cpu"
        max_memory = DEFAULT_MAX_MEMORY if cpu else DEFAULT_MAX_MEMORY_ACCELERATOR
    ks = _bound_sizes(bounds, num_samples)
    pair_bytes, dtype = _probe(model, guide, x, max_plate_nesting)
    chunk, batch, group = _plan(len(x), num_samples, pair_bytes, max_memory, chunk_size, batch_size)
    flat_tol = FLAT_ULPS * torch.finfo(dtype).eps
    traced = _traced_passes(compile, len(x) * num_samples, model, guide, max_plate_nesting)
    bar = tqdm(total=len(x), unit="point", disable=None if progress else True, leave=False)
    with torch.no_grad(), pyro.validation_enabled(False), bar:
        groups = []
        for x_group in x.split(group):
            blocks = []
            for x_block in x_group.split(batch):
                blocks.append(
                    _estimate_block(
                        model, guide, x_block, num_samples, chunk, max_plate_nesting, traced
                    )
                )
                bar.update(len(x_block))
            terms = {name: torch.cat([block[name] for block in blocks]) for name in blocks[0]}
            terms.update(_weight_statistics(terms["log_weights"], ks, flat_tol))
            if not return_log_weights:
                del terms["log_weights"]
            # One transfer per group: the passes and the statistics stay on the device.
            groups.append({name: value.cpu() for name, value in terms.items()})
    fields = {name: torch.cat([terms[name] for terms in groups]) for name in groups[0]}
    iwae = {k: fields.pop(f"iwae_{k}") for k in ks}
    return MarginalLikelihood(**fields, iwae=iwae, num_samples=num_samples)


def _check_arguments(
    x: Tensor,
    num_samples: int,
    chunk_size: int | None,
    batch_size: int | None,
    max_memory: int | None,
    max_plate_nesting: int,
) -> None:
    check_int(num_samples, "num_samples")
    for name, value in (
        ("chunk_size", chunk_size),
        ("batch_size", batch_size),
        ("max_memory (bytes)", max_memory),
    ):
        if value is not None:
            check_int(value, name)
    if not (isinstance(max_plate_nesting, int) and max_plate_nesting >= 0):
        raise ValueError(f"max_plate_nesting must be >= 0, got {max_plate_nesting!r}")
    if not isinstance(x, Tensor | Labelled):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    x = data_of(x)
    if x.dim() < 2:
        raise ValueError(
            f"x must have shape (num_points, *features), got {tuple(x.shape)}; "
            "for a single point use x.unsqueeze(0)"
        )
    if len(x) == 0:
        raise ValueError(f"x is empty (shape {tuple(x.shape)}); pass at least one data point")
    if x.is_floating_point() and not torch.isfinite(x).all():
        raise ValueError("x contains NaN or infinite values; clean or impute the data first")


def like_parameters(x: Tensor, *programs: Program) -> Tensor:
    """Floating data in the dtype and on the device of the programs' parameters (float64
    data for a float32 model, CPU data for a model on a GPU, say); integer data are refused,
    since their scale is unknown."""
    if not x.is_floating_point():
        raise ValueError(
            f"x has integer dtype {x.dtype}; pass floats in the scale the model was trained on "
            "(e.g. x / 255.0 for 8-bit images)"
        )
    for program in programs:
        if isinstance(program, torch.nn.Module):
            for p in program.parameters():
                if p.is_floating_point():
                    return x.to(p.device, p.dtype)
    return x


def _is_count(value: object) -> bool:
    try:
        check_int(value, "k")
    except ValueError:
        return False
    return True


def _bound_sizes(bounds: Sequence[int] | None, num_samples: int) -> tuple[int, ...]:
    if bounds is None:
        powers = [10**i for i in range(int(math.log10(num_samples)) + 1)]
        return tuple(sorted({*powers, num_samples}))
    bad = [k for k in bounds if not _is_count(k) or k > num_samples]
    if bad:
        raise ValueError(f"bounds must be integers in [1, num_samples={num_samples}], got {bad}")
    return tuple(sorted(set(bounds)))


def _probe(model: Program, guide: Program, x: Tensor, max_plate_nesting: int) -> tuple[int, Any]:
    """Runs guide and model once on two points, checks their structure, sizes one pass.

    Returns:
        The estimated bytes one (particle, point) pair needs in a pass, and the dtype the
        log densities are computed in.
    """
    sample, num_particles = x[:2], 2
    with torch.no_grad(), _input_errors(x, max_plate_nesting):
        scores = _score(model, guide, sample, num_particles, max_plate_nesting)
    check_sites(scores)
    sites = [
        site
        for trace in (scores.guide_trace, scores.model_trace)
        for site in trace.nodes.values()
        if site["type"] == "sample"
    ]
    numel = sum(math.prod(site["fn"].batch_shape + site["fn"].event_shape) for site in sites)
    item = max(site["value"].element_size() for site in sites)
    pair_bytes = math.ceil(_WORKSPACE_FACTOR * numel * item / (num_particles * len(sample)))
    floats = (site["value"].dtype for site in sites if site["value"].is_floating_point())
    return pair_bytes, next(floats, torch.get_default_dtype())


@contextmanager
def _input_errors(x: Tensor, max_plate_nesting: int) -> Iterator[None]:
    """Turns a failure of the user's program on ``x`` into one clear line."""
    try:
        yield
    except SiteError:
        raise
    except (RuntimeError, ValueError, TypeError, IndexError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(
            f"the model or guide failed on x of shape {tuple(x.shape)}: {reason}; check that "
            "x is (num_points, *features) as the model expects and that it nests at most "
            f"{max_plate_nesting} plate(s)"
        ) from err


def _plan(
    num_points: int,
    num_samples: int,
    pair_bytes: int,
    max_memory: int,
    chunk_size: int | None,
    batch_size: int | None,
) -> tuple[int, int, int]:
    """Particles per pass, points per block and points per statistics group."""
    pairs = max(1, max_memory // pair_bytes)
    if chunk_size is None and batch_size is not None:
        chunk_size = max(1, pairs // batch_size)
    chunk = min(chunk_size or pairs, num_samples)
    if chunk_size is None:
        chunk = math.ceil(num_samples / math.ceil(num_samples / chunk))  # no small last pass
    batch = min(batch_size or max(1, pairs // chunk), num_points)
    rows = max_memory // (_BYTES_PER_LOG_WEIGHT * num_samples)
    return chunk, batch, min(max(1, rows // batch) * batch, num_points)


def _estimate_block(
    model: Program,
    guide: Program,
    x: Tensor,
    num_samples: int,
    chunk: int,
    max_plate_nesting: int,
    traced: _TracedPasses | None = None,
) -> dict[str, Tensor]:
    """All K log weights of a block of points, and its mean reconstruction and KL terms."""
    log_weights, reconstruction, kl = [], 0.0, 0.0
    for start in range(0, num_samples, chunk):
        num_particles = min(chunk, num_samples - start)
        if traced is not None:
            log_weight, log_likelihood, pass_kl = traced.run(x, num_particles)
        else:
            log_weight, log_likelihood, pass_kl = _pass(
                model, guide, x, num_particles, max_plate_nesting
            )
        log_weights.append(log_weight)
        reconstruction = reconstruction + log_likelihood
        kl = kl + pass_kl
    return {
        "log_weights": torch.cat(log_weights).T.contiguous(),
        "reconstruction": reconstruction / num_samples,
        "kl": kl / num_samples,
    }


AUTO_MIN_PAIRS = 10_000_000
"""Under ``compile="auto"``, an estimate of at least this many (point, draw) pairs scores
its passes through a compiled trace (the MNIST test set at K = 5,000 is 50 million).
Measured on 2 CPU cores (benchmarks/eval_throughput.py, MNIST 784-400-50): the trace and
the compile cost about 10 s once."""


def _pass(
    model: Program, guide: Program, x: Tensor, num_particles: int, max_plate_nesting: int
) -> tuple[Tensor, Tensor, Tensor]:
    """One pass: the ``(particles, points)`` log weights, and the log-likelihood and KL terms
    summed over the particles, per point."""
    scores = _score(model, guide, x, num_particles, max_plate_nesting)
    return scores.log_weight, scores.log_likelihood.sum(0), scores.kl.sum(0)


class _TracedPasses(TracedProgram):
    """The passes of one estimate as a traced tensor program (see :func:`_pass`)."""

    def __init__(self, model: nn.Module, guide: nn.Module, max_plate_nesting: int) -> None:
        super().__init__(nn.ModuleDict({"model": model, "guide": guide}), [], True, "scoring pass")
        # Weak references: the program is cached per model and must not keep it alive.
        self._model, self._guide = weakref.ref(model), weakref.ref(guide)
        self._module = None
        self.max_plate_nesting = max_plate_nesting

    @property
    def model(self) -> nn.Module | None:
        return self._model()

    @property
    def guide(self) -> nn.Module | None:
        return self._guide()

    @property
    def module(self) -> nn.Module:
        return nn.ModuleDict({"model": self.model, "guide": self.guide})

    def _run(self, params: list[Tensor], x: Tensor, num_particles: int) -> Any:
        return _pass(self.model, self.guide, x, num_particles, self.max_plate_nesting)


def _traced_passes(
    mode: str | bool, pairs: int, model: Program, guide: Program, max_plate_nesting: int
) -> _TracedPasses | None:
    if not compile_wanted(mode, pairs, AUTO_MIN_PAIRS):
        return None
    if not (isinstance(model, nn.Module) and isinstance(guide, nn.Module)):
        return None
    # One program per (model, guide) pair, kept while the model lives: a later estimate
    # (each epoch's, a benchmark's repeats) replays the graphs already traced and compiled.
    programs = _TRACED.setdefault(model, [])
    for program in programs:
        if program.guide is guide and program.max_plate_nesting == max_plate_nesting:
            return program
    try:
        program = _TracedPasses(model, guide, max_plate_nesting)
    except NotCompilable:
        return None
    programs.append(program)
    return program


_TRACED: weakref.WeakKeyDictionary[nn.Module, list[_TracedPasses]] = weakref.WeakKeyDictionary()


def _score(
    model: Program, guide: Program, x: Tensor, num_particles: int, max_plate_nesting: int
) -> Scores:
    """The unscaled scores of one pass, in float64: the estimate is of the model itself."""
    return score(
        model,
        guide,
        x,
        num_particles=num_particles,
        max_plate_nesting=max_plate_nesting,
        scaled=False,
        dtype=torch.float64,
    )


def _weight_statistics(
    log_weights: Tensor, ks: tuple[int, ...], flat_tol: float
) -> dict[str, Tensor]:
    """Per-row estimate, standard error, ESS, k̂, ELBO and IWAE bounds of ``(B, K)`` weights."""
    num_samples = log_weights.shape[-1]
    log_total = torch.logsumexp(log_weights, -1, keepdim=True)
    sum_squares = (2 * (log_weights - log_total)).exp().sum(-1)
    if num_samples > 1:
        stderr = ((num_samples * sum_squares - 1).clamp(min=0) / (num_samples - 1)).sqrt()
    else:
        stderr = torch.full_like(sum_squares, math.nan)
    stats = {
        "log_px": log_total.squeeze(-1) - math.log(num_samples),
        "stderr": stderr,
        "ess": 1 / sum_squares,
        "khat": pareto_khat(log_weights, flat_tol),
        "elbo": log_weights.mean(-1),
    }
    for k in ks:
        if k in (1, num_samples):
            stats[f"iwae_{k}"] = stats["elbo" if k == 1 else "log_px"]
            continue
        groups = log_weights[:, : num_samples // k * k].unflatten(-1, (-1, k))
        stats[f"iwae_{k}"] = (torch.logsumexp(groups, -1) - math.log(k)).mean(-1)
    return stats
