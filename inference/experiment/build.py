"""From a spec to objects: the model and guide, the objective, KL schedule, optimizer and
learning-rate schedule, each component built from its registry entry.

A component table (``{ kind = "...", option = value }``) names an entry of one registry; its
other keys go to that constructor, whose signature is the schema (:func:`schema`). Context
the constructor asks for by name (``latent_dim``, ``in_features``, ``out_features``,
``features``, ``image_shape``, ``encoder``) is filled in by :func:`build`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pyrovae.guides import (
    ENCODERS,
    AmortizedGuide,
    Classifier,
    ConditionalGuide,
    SemiSupervisedGuide,
    TopDownGuide,
)
from pyrovae.inference.algorithms.objectives import OBJECTIVES
from pyrovae.inference.algorithms.schedules import SCHEDULES, KLSchedule
from pyrovae.inference.errors import PyrovaeError
from pyrovae.inference.experiment.recipes import LR_SCHEDULES, OPTIMIZERS
from pyrovae.model import (
    DECODERS,
    LIKELIHOODS,
    PRIORS,
    VAE,
    ConditionalNormal,
    ConditionalVAE,
    SemiSupervisedVAE,
)
from pyrovae.model.networks import initialize

if TYPE_CHECKING:
    from pyrovae.inference.experiment.spec import Spec

__all__ = [
    "CONTEXT_NAMES",
    "build",
    "build_lr_schedule",
    "build_objective",
    "build_optimizer",
    "build_schedule",
    "component",
    "constructor_of",
    "options_of",
    "schema",
]


def build(
    spec: Spec, features: int, image_shape: tuple[int, ...] | None = None
) -> tuple[VAE, AmortizedGuide]:
    """Builds the model and guide a spec describes, for data with ``features`` columns.

    Args:
        spec: the spec.
        features: number of data features F (pixels for flattened images).
        image_shape: ``(H, W)`` or ``(C, H, W)`` when the data are images, for convolutional
            networks and likelihoods that read the channels.

    Returns:
        ``(model, guide)``: the Pyro model ``VAE`` and the ``AmortizedGuide``.
    """
    m = spec.model
    context = {
        "latent_dim": m.latent_dim,
        "features": features,
        "in_features": features,
        "image_shape": tuple(image_shape) if image_shape else None,
    }
    classes = m.classes if m.labels in ("context", "latent") else 0
    if classes and m.labels == "latent" and m.layers:
        raise PyrovaeError("model.labels = 'latent' (M2) takes no model.layers; remove them")
    if classes:
        if spec.guide.encoder.get("network", "mlp") != "mlp" or m.prior["kind"] == "vamp":
            raise PyrovaeError(
                "model.labels = 'context' reads [x, one_hot(y)] rows, which needs an mlp "
                "encoder and a prior other than vamp"
            )
        context["in_features"] = features + classes  # q(z | x, y) reads [x, one_hot(y)]
    likelihood = component(LIKELIHOODS, m.likelihood, "model.likelihood", context)
    dims = [m.latent_dim] + [layer.latent_dim for layer in m.layers]
    skip = m.hierarchy == "skip"
    if skip and classes:
        raise PyrovaeError(
            "model.hierarchy = 'skip' takes no labels; set model.labels = 'none' or use a chain"
        )
    # With "skip" the encoder is q(z_top | x): the guide runs top-down from it.
    encoder_context = {**context, "latent_dim": dims[-1]} if skip else context
    encoder = component(ENCODERS, spec.guide.encoder, "guide.encoder", encoder_context)
    if m.layers and m.prior["kind"] == "vamp" and not skip:
        raise PyrovaeError(
            "model.prior kind 'vamp' needs q(z|x) of the top latent, which a chain of "
            "model.layers does not have in closed form; set model.hierarchy = 'skip' (the "
            "guide then reads x at every level), choose another prior, or remove the layers"
        )
    top = {**context, "latent_dim": dims[-1], "encoder": encoder, "classes": m.classes}
    if m.prior["kind"] == "label_normal" and m.labels != "context":
        raise PyrovaeError(
            "model.prior kind 'label_normal' is p(z | y) of a conditional VAE; set "
            "model.labels = 'context'"
        )
    prior = component(PRIORS, m.prior, "model.prior", top)
    out_features = features * getattr(likelihood, "num_params", 1)
    decoder_in = sum(dims) if skip else dims[0]
    decoder_context = {**context, "latent_dim": decoder_in + classes, "out_features": out_features}
    decoder = component(DECODERS, m.decoder, "model.decoder", decoder_context)
    model_layers, guide_layers = [], []
    for i, layer in enumerate(m.layers):
        options = (layer.hidden, layer.activation, 1e-4, layer.network)
        try:
            model_layers.append(ConditionalNormal(dims[i + 1], dims[i], *options))
            if skip:  # q(z_i | x, z_{i+1}), top-down
                guide_layers.append(ConditionalNormal(features + dims[i + 1], dims[i], *options))
            else:  # q(z_{i+1} | z_i), bottom-up
                guide_layers.append(ConditionalNormal(dims[i], dims[i + 1], *options))
        except (TypeError, ValueError, PyrovaeError) as e:
            raise PyrovaeError(f"model.layers[{i}]: {e}") from None
    networks = [getattr(decoder, "net", None), getattr(encoder, "net", None)]
    networks += [layer.net for layer in (*model_layers, *guide_layers)]
    if m.labels == "latent":
        trunk = spec.guide.encoder
        classifier = Classifier(
            features,
            classes,
            trunk.get("hidden") or [500],
            trunk.get("activation", "relu"),
        )
        networks.append(classifier.net)
    for net in networks:
        if isinstance(net, nn.Module):
            initialize(net, m.init)
    if m.labels == "latent":
        alpha = m.classification_weight
        model = SemiSupervisedVAE(prior, decoder, likelihood, classes, classifier, alpha)
        return model, SemiSupervisedGuide(encoder, classifier, classes)
    if classes:
        model = ConditionalVAE(prior, decoder, likelihood, classes, model_layers)
    else:
        model = VAE(prior, decoder, likelihood, model_layers, skip=skip)
    if skip:
        return model, TopDownGuide(encoder, guide_layers)
    if classes:
        return model, ConditionalGuide(encoder, classes, guide_layers)
    return model, AmortizedGuide(encoder, guide_layers)


def build_objective(spec: Spec) -> Any:
    """The objective (a Pyro ELBO) that ``spec.train.objective`` names."""
    return component(OBJECTIVES, spec.train.objective, "train.objective", {})


def build_schedule(spec: Spec) -> KLSchedule:
    """The KL schedule (``fit``'s ``kl_schedule``) that ``spec.train.kl`` names."""
    return component(SCHEDULES, spec.train.kl, "train.kl", {})


def build_optimizer(spec: Spec, params: Iterable[Any]) -> torch.optim.Optimizer:
    """The optimizer ``spec.train.optimizer`` names, at learning rate ``spec.train.lr``."""
    context = {"params": list(params), "lr": spec.train.lr}
    return component(OPTIMIZERS, spec.train.optimizer, "train.optimizer", context)


def build_lr_schedule(spec: Spec, optimizer: torch.optim.Optimizer) -> Any:
    """The learning-rate scheduler ``spec.train.lr_schedule`` names (None for constant)."""
    context = {"optimizer": optimizer, "epochs": spec.train.epochs}
    return component(LR_SCHEDULES, spec.train.lr_schedule, "train.lr_schedule", context)


def component(
    registry: Mapping[str, Callable[..., Any]],
    table: Mapping[str, Any],
    where: str,
    context: Mapping[str, Any],
) -> Any:
    """Calls the constructor ``table["kind"]`` names with the table's options and the context
    arguments its signature asks for.

    Raises:
        PyrovaeError: unknown kind or option (listing the valid ones), or a bad value.
    """
    constructor, options = constructor_of(registry, table, where)
    kind = table["kind"]
    injected = {k: v for k, v in context.items() if k in parameters_of(constructor)}
    try:
        built = constructor(**options, **injected)
    except (TypeError, ValueError) as e:
        raise PyrovaeError(f"{where} (kind {kind!r}): {e}") from None
    return built


def constructor_of(
    registry: Mapping[str, Callable[..., Any]],
    table: Mapping[str, Any],
    where: str,
) -> tuple[Callable[..., Any], dict[str, Any]]:
    kind = table.get("kind")
    if kind not in registry:
        raise PyrovaeError(f"unknown {where}.kind {kind!r}; valid: {', '.join(registry)}")
    constructor = registry[kind]
    valid = options_of(constructor)
    options = {k: v for k, v in table.items() if k != "kind"}
    unknown = [k for k in options if k not in valid]
    if unknown:
        raise PyrovaeError(
            f"unknown option {where}.{unknown[0]} for kind {kind!r}; "
            f"valid: {', '.join(valid) if valid else '(none)'}"
        )
    return constructor, options


CONTEXT_NAMES = frozenset(
    {
        "latent_dim",
        "features",
        "in_features",
        "out_features",
        "image_shape",
        "encoder",
        "params",
        "lr",
        "optimizer",
        "epochs",
        "classes",
    }
)
"""Constructor parameters that :func:`build` fills in from the rest of the spec and the data;
in a component table they would be ignored or conflict, so they are not spec options."""


def options_of(constructor: Callable[..., Any]) -> list[str]:
    """The options a component table may set for ``constructor``: its schema less the
    context names that :func:`build` fills in."""
    return [p for p in parameters_of(constructor) if p not in CONTEXT_NAMES]


def schema(constructor: Callable[..., Any]) -> dict[str, inspect.Parameter]:
    """The keyword parameters a constructor takes, by name: the spec's schema for its entry.

    A class whose ``__init__`` passes ``**kwargs`` on to its base (zuko's ``NSF(MAF)``
    pattern, the encoders' shared trunk) takes the base's keywords too.
    """
    params: dict[str, inspect.Parameter] = {}
    passes_on = False
    for name, p in inspect.signature(constructor).parameters.items():
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            params[name] = p
        passes_on |= p.kind == p.VAR_KEYWORD
    if passes_on and isinstance(constructor, type):
        bases = [b for b in constructor.__mro__[1:] if "__init__" in vars(b)]
        if bases and bases[0] is not object:
            params = {**schema(bases[0]), **params}
    return params


def parameters_of(constructor: Callable[..., Any]) -> list[str]:
    return list(schema(constructor))
