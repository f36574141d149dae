"""The declarative spec: TOML read into frozen dataclasses, checked against the registries.

A spec holds data only. Each component table (``{ kind = "...", option = value }``) names an
entry of one registry (``model.PRIORS``, ``model.DECODERS``, ``model.LIKELIHOODS``,
``guides.ENCODERS``, ``inference.algorithms.objectives.OBJECTIVES``,
``inference.algorithms.schedules.SCHEDULES``, the recipes' optimizers and learning-rate
schedules); its other keys are passed to that constructor, whose signature is the schema.
:mod:`pyrovae.inference.experiment.build` builds the objects.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w
import tomllib

from pyrovae.guides import ENCODERS
from pyrovae.inference.algorithms.compiled import COMPILE_MODES
from pyrovae.inference.algorithms.objectives import OBJECTIVES
from pyrovae.inference.algorithms.schedules import SCHEDULES
from pyrovae.inference.errors import PyrovaeError
from pyrovae.inference.experiment.build import constructor_of
from pyrovae.inference.experiment.images import check_image_options
from pyrovae.inference.experiment.recipes import LR_SCHEDULES, OPTIMIZERS
from pyrovae.model import (
    DECODERS,
    LIKELIHOODS,
    PRIORS,
)
from pyrovae.model.networks import INITS


def _table(**entries: Any) -> Any:
    return field(default_factory=lambda: dict(entries))


HIERARCHIES = ("chain", "skip")
"""Values of ``model.hierarchy``, how the layers of a stack are wired: ``"chain"``, each
conditional reads only its neighbour (the decoder z1; the guide bottom-up, q(z1|x), then
q(z2|z1), ...; Burda et al.); ``"skip"``, the decoder reads every latent and the guide reads x
at every level, top-down: q(z_L|x) (``guide.encoder``), then q(z_l | x, z_{l+1}) (Tomczak and
Welling's hierarchical VAE)."""

LABEL_USES = ("none", "context", "latent")
"""Values of ``model.labels``: unused by the model, observed context (a conditional VAE), or
a latent class observed where known (M2, semi-supervised)."""

MAX_LATENT_DIM = 4096
"""The largest ``model.latent_dim`` a spec may ask for."""


@dataclass(frozen=True)
class Range:
    """The values a numeric spec key may take: finite, between ``low`` and ``high``."""

    low: float | None = None
    high: float | None = None
    above: bool = False
    """``low`` itself is excluded."""

    def check(self, value: float, path: str, integer: bool = False) -> None:
        ok = math.isfinite(value)
        what = "an integer" if integer else "a finite number"
        if ok and self.low is not None:
            ok = value > self.low if self.above else value >= self.low
        if ok and self.high is not None:
            ok = value <= self.high
        if not ok:
            raise PyrovaeError(f"{path} must be {what}{self}, got {value!r}")

    def __str__(self) -> str:
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.above else '>='} {self.low}")
        if self.high is not None:
            parts.append(f"<= {self.high}")
        return " " + " and ".join(parts) if parts else ""


def _ranged(
    default: Any, low: float | None = None, high: float | None = None, above: bool = False
) -> Any:
    return field(default=default, metadata={"range": Range(low, high, above)})


@dataclass(frozen=True)
class DataSpec:
    name: str = "digits"
    # The default run models the digits' 17 grey levels as they are (a Gaussian likelihood
    # below): binarizing 8x8 digits leaves mostly noise, and the model then learns little
    # more than the class (KL about 2 nats, prototype reconstructions).
    binarize: str = "none"
    path: str | None = None
    validation_size: int | float | None = _ranged(None, 0, above=True)
    limit: int | None = _ranged(None, 1)
    # With model.labels = "latent": the training labels kept per class (a fixed seed picks
    # them); the rest of the training split is unlabelled.
    labels_per_class: int | None = _ranged(None, 1)
    # ... and the labelled rows repeated to about this share of the training rows (0 or
    # unset: each once).
    labelled_share: float | None = _ranged(None, 0, 0.99)
    # A folder of images (data.name = "path/to/folder") or sklearn-photos: the size every
    # image is scaled and centre-cropped to (a side, or [height, width]; unset: the images'
    # own, which must agree) and its channels (1 greyscale, 3 RGB; unset: as found).
    image_size: int | list | None = None
    channels: int | None = None


@dataclass(frozen=True)
class LayerSpec:
    """One stochastic layer above z1 (``[[model.layers]]``, listed upwards: z2, z3, ...): its
    size, and the MLP of both conditionals linking it to the layer below, p(z_below | z) in
    the model and q(z | z_below) in the guide."""

    latent_dim: int = _ranged(50, 1, MAX_LATENT_DIM)
    hidden: list = field(default_factory=lambda: [100, 100])
    activation: str = "tanh"
    network: str = "mlp"  # or "gated_mlp"


@dataclass(frozen=True)
class ModelSpec:
    latent_dim: int = _ranged(16, 1, MAX_LATENT_DIM)
    prior: dict = _table(kind="standard_normal")
    # ReLU: with softplus the default budget on digits ends in posterior collapse.
    decoder: dict = _table(kind="feedforward", network="mlp", activation="relu")
    # A Gaussian whose scale is learned by maximum likelihood (the MSE loss with its weight
    # against the KL fitted to the data), started at the data's standard deviation.
    likelihood: dict = _table(kind="gaussian", learn_scale=True)
    # Stacked latents above z (then named z1): none by default, a one-layer VAE.
    layers: list[LayerSpec] = field(default_factory=list)
    # How a stack is wired (see HIERARCHIES): "chain", Burda et al.'s; "skip", Tomczak and
    # Welling's hierarchical VAE. Then guide.encoder is q(z_top | x), of the top latent.
    hierarchy: str = "chain"
    # How the networks' linear layers start, model and guide alike (pyrovae.model.networks
    # .INITS): PyTorch's own, Glorot's (Burda et al.) or He's (Tomczak and Welling).
    init: str = "torch"
    # "context": the data's labels are observed context of encoder and decoder (a
    # conditional VAE over `classes` classes); "latent": a latent class, observed for the
    # data.labels_per_class labelled points (M2); "none": labels are only used by reports.
    labels: str = "none"
    classes: int = _ranged(10, 2, 1000)
    # M2: weight of log q(y|x) per labelled point (Kingma et al.'s alpha = 0.1 N, over N_l
    # labelled points: about 50 for 100 labels among 50,000 points).
    classification_weight: float = _ranged(50.0, 0)


@dataclass(frozen=True)
class GuideSpec:
    encoder: dict = _table(kind="diagonal_normal", network="mlp", activation="relu")


@dataclass(frozen=True)
class TrainSpec:
    objective: dict = _table(kind="elbo", num_particles=1)
    kl: dict = _table(kind="constant", beta=1.0)
    optimizer: dict = _table(kind="adam")
    lr_schedule: dict = _table(kind="constant")
    epochs: int = _ranged(50, 1)
    # 1,347 training digits: batches of 32 give 2,100 steps in 50 epochs, about 15 s.
    batch_size: int = _ranged(32, 1)
    lr: float = _ranged(1e-3, 0, above=True)
    seed: int = _ranged(0, 0, 2**32 - 1)  # NumPy seeds take 32 bits
    grad_clip: float | None = _ranged(None, 0, above=True)
    patience: int | None = _ranged(None, 1)
    guide_warmup: int = _ranged(0, 0)  # epochs a richer guide trains as its diagonal base
    device: str = "auto"
    log: str = "none"
    # The training step as a traced, compiled tensor program: "auto" (fits of at least
    # 4,000 steps, where it was measured faster), true ("on") or false ("off").
    compile: str | bool = "auto"


@dataclass(frozen=True)
class Spec:
    """A whole run: data, model, guide and training settings. ``Spec()`` is the default."""

    data: DataSpec = field(default_factory=DataSpec)
    model: ModelSpec = field(default_factory=ModelSpec)
    guide: GuideSpec = field(default_factory=GuideSpec)
    train: TrainSpec = field(default_factory=TrainSpec)

    def to_dict(self) -> dict:
        """The spec as nested dicts, with unset (None) keys left out."""
        return _drop_none(dataclasses.asdict(self))

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())

    def replace(self, **sections: Mapping[str, Any]) -> Spec:
        """A copy with some keys of some sections changed, e.g. ``replace(train={"epochs": 2})``."""
        return spec_from_dict(_merge(self.to_dict(), sections))


def load_spec(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Spec:
    """Reads a TOML spec over the default spec and applies ``KEY=VALUE`` overrides.

    Args:
        path: a TOML file.
        overrides: strings such as ``model.latent_dim=2`` or ``model.prior.kind="mixture"``;
            the value is read as a TOML value, and a bare word that is not valid TOML is taken
            as a string.

    Raises:
        PyrovaeError: the file is missing or malformed, or a key, kind or option is unknown.
    """
    raw = Spec().to_dict()
    if path is not None:
        path = Path(path)
        try:
            raw = _merge(raw, tomllib.loads(path.read_text()))
        except FileNotFoundError:
            raise PyrovaeError(f"spec file {path} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise PyrovaeError(f"spec file {path} is not valid TOML: {e}") from None
        except UnicodeDecodeError:
            raise PyrovaeError(
                f"spec file {path} is not a text file (a data file or an image?); the spec is "
                'TOML, and data are named in it: --set data.name="PATH"'
            ) from None
        except IsADirectoryError:
            raise PyrovaeError(f"spec file {path} is a directory; give a TOML file") from None
    return with_overrides(spec_from_dict(raw), overrides)


def with_overrides(spec: Spec, overrides: Iterable[str] = ()) -> Spec:
    """A copy of ``spec`` with ``KEY=VALUE`` overrides applied (as ``--set`` takes them),
    checked against the registries.

    Raises:
        PyrovaeError: a malformed override, or an unknown key, kind or option.
    """
    raw = spec.to_dict()
    for item in overrides:
        raw = _merge(raw, _override(item))
    spec = spec_from_dict(raw)
    check(spec)
    return spec


def spec_from_dict(raw: Mapping[str, Any]) -> Spec:
    """Builds a :class:`Spec` from nested dicts, rejecting unknown keys and wrong types."""
    return _section(Spec, raw, "")


def check(spec: Spec) -> None:
    """Checks every component's kind and options against its registry, without building."""
    for registry, table, where in _components(spec):
        constructor_of(registry, table, where)
    _check_applies(spec)
    if not isinstance(spec.train.compile, bool) and spec.train.compile not in COMPILE_MODES:
        raise PyrovaeError(
            f"train.compile must be true, false or one of {', '.join(COMPILE_MODES)}, "
            f"got {spec.train.compile!r}"
        )
    if spec.model.init not in INITS:
        raise PyrovaeError(f"model.init must be one of {', '.join(INITS)}, got {spec.model.init!r}")
    if spec.model.hierarchy not in HIERARCHIES:
        raise PyrovaeError(
            f"model.hierarchy must be one of {', '.join(HIERARCHIES)}, got {spec.model.hierarchy!r}"
        )
    if spec.model.hierarchy != "chain" and not spec.model.layers:
        raise PyrovaeError(
            f"model.hierarchy = {spec.model.hierarchy!r} wires a stack, but model.layers is "
            "empty; add [[model.layers]] or remove model.hierarchy"
        )
    if spec.model.labels not in LABEL_USES:
        raise PyrovaeError(
            f"model.labels must be one of {', '.join(LABEL_USES)}, got {spec.model.labels!r}"
        )


def _check_applies(spec: Spec) -> None:
    """Refuses keys that the rest of the spec makes meaningless, rather than recording a
    setting that had no effect."""
    d, m = spec.data, spec.model
    if d.name in ("digits", "sklearn-photos") and d.path is not None:
        raise PyrovaeError(
            f"data.path does not apply to data.name = {d.name!r}, which is bundled with "
            "scikit-learn; remove data.path, or set data.name to mnist, fashion-mnist, "
            "cifar-10, a file or a folder"
        )
    if d.name == "sklearn-photos" and d.validation_size is not None:
        raise PyrovaeError(
            "data.validation_size does not apply to data.name = 'sklearn-photos', whose "
            "splits are regions of the photos; remove data.validation_size"
        )
    check_image_options(d.image_size, d.channels)
    if m.labels != "latent":
        for key in ("labels_per_class", "labelled_share"):
            if getattr(d, key) is not None:
                raise PyrovaeError(
                    f"data.{key} applies only to a semi-supervised model "
                    f"(model.labels = 'latent'), and model.labels is {m.labels!r}; remove "
                    f"data.{key} or set model.labels = 'latent'"
                )


def _components(spec: Spec) -> list[tuple[Mapping[str, Callable[..., Any]], dict, str]]:
    return [
        (PRIORS, spec.model.prior, "model.prior"),
        (DECODERS, spec.model.decoder, "model.decoder"),
        (LIKELIHOODS, spec.model.likelihood, "model.likelihood"),
        (ENCODERS, spec.guide.encoder, "guide.encoder"),
        (OBJECTIVES, spec.train.objective, "train.objective"),
        (SCHEDULES, spec.train.kl, "train.kl"),
        (OPTIMIZERS, spec.train.optimizer, "train.optimizer"),
        (LR_SCHEDULES, spec.train.lr_schedule, "train.lr_schedule"),
    ]


def _section(cls: type, raw: Any, where: str) -> Any:
    name = where or "spec"
    if not isinstance(raw, Mapping):
        raise PyrovaeError(f"{name} must be a table, got {raw!r}")
    hints = typing.get_type_hints(cls)
    ranges = {f.name: f.metadata.get("range") for f in dataclasses.fields(cls)}
    fields = list(ranges)
    unknown = [k for k in raw if k not in fields]
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise PyrovaeError(f"unknown spec key {key!r}; valid under {name}: {', '.join(fields)}")
    values = {}
    for key, value in raw.items():
        path = f"{where}.{key}" if where else key
        hint = hints[key]
        item = typing.get_args(hint)[0] if typing.get_origin(hint) is list else None
        if dataclasses.is_dataclass(hint):
            values[key] = _section(hint, value, path)
        elif dataclasses.is_dataclass(item):
            if not isinstance(value, list):
                raise PyrovaeError(f"{path} must be a list of tables ([[{path}]]), got {value!r}")
            values[key] = [_section(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
        else:
            values[key] = _checked(value, hint, path)
            if ranges[key] is not None and values[key] is not None:
                integer = int in (typing.get_args(hint) or (hint,))
                ranges[key].check(values[key], path, integer)
    return cls(**values)


def _checked(value: Any, hint: Any, path: str) -> Any:
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    for t in allowed:
        if t is type(None):
            continue
        if t is dict and isinstance(value, Mapping):
            if "kind" not in value:
                raise PyrovaeError(f'{path} needs a kind, e.g. {path} = {{ kind = "..." }}')
            return dict(value)
        if t is float and isinstance(value, int | float) and not isinstance(value, bool):
            return value
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t is str and isinstance(value, str):
            return value
        if t is bool and isinstance(value, bool):
            return value
        if t is list and isinstance(value, list):
            return list(value)
    names = " or ".join(
        "table" if t is dict else t.__name__ for t in allowed if t is not type(None)
    )
    raise PyrovaeError(f"{path} must be of type {names}, got {value!r}")


def _override(item: str) -> dict:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise PyrovaeError(f"--set {item!r} must look like KEY=VALUE, e.g. model.latent_dim=2")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    nested: dict = {}
    node = nested
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return nested


def _merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict:
    merged = dict(base)
    for key, value in update.items():
        old = merged.get(key)
        # A table merges into the old one unless it names a different kind: then its old
        # options may not apply, so it starts afresh.
        if (
            isinstance(old, Mapping)
            and isinstance(value, Mapping)
            and value.get("kind", old.get("kind")) == old.get("kind")
        ):
            merged[key] = _merge(old, value)
        else:
            merged[key] = value
    return merged


def _drop_none(d: Mapping[str, Any]) -> dict:
    return {
        k: _drop_none(v) if isinstance(v, Mapping) else v for k, v in d.items() if v is not None
    }


__all__ = [
    "DataSpec",
    "GuideSpec",
    "LayerSpec",
    "ModelSpec",
    "Spec",
    "TrainSpec",
    "check",
    "load_spec",
    "spec_from_dict",
    "with_overrides",
]
