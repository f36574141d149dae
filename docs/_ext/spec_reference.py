"""The spec reference as reStructuredText, generated from the code so it cannot drift.

Every section of the spec is rendered from its dataclass (key, type, default, allowed values)
and every registry from its constructors' signatures (kind, constructor, options with their
defaults): the same signatures a spec is checked against. Plain Python, so that the tests
can check it without Sphinx; ``pyrovae_docs`` puts it into the site.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import typing
from collections.abc import Callable, Mapping
from typing import Any


def _sections() -> list[tuple[str, type]]:
    from pyrovae.inference.experiment import spec

    return [
        ("[data]", spec.DataSpec),
        ("[model]", spec.ModelSpec),
        ("[[model.layers]]", spec.LayerSpec),
        ("[guide]", spec.GuideSpec),
        ("[train]", spec.TrainSpec),
    ]


def _registries() -> list[tuple[str, str, Mapping[str, Callable[..., Any]]]]:
    from pyrovae.guides import ENCODERS
    from pyrovae.inference.algorithms.objectives import OBJECTIVES
    from pyrovae.inference.algorithms.schedules import SCHEDULES
    from pyrovae.inference.experiment.recipes import LR_SCHEDULES, OPTIMIZERS
    from pyrovae.model import DECODERS, LIKELIHOODS, PRIORS

    return [
        ("model.prior", "pyrovae.model.PRIORS", PRIORS),
        ("model.decoder", "pyrovae.model.DECODERS", DECODERS),
        ("model.likelihood", "pyrovae.model.LIKELIHOODS", LIKELIHOODS),
        ("guide.encoder", "pyrovae.guides.ENCODERS", ENCODERS),
        ("train.objective", "pyrovae.inference.algorithms.objectives.OBJECTIVES", OBJECTIVES),
        ("train.kl", "pyrovae.inference.algorithms.schedules.SCHEDULES", SCHEDULES),
        ("train.optimizer", "pyrovae.inference.experiment.recipes.OPTIMIZERS", OPTIMIZERS),
        ("train.lr_schedule", "pyrovae.inference.experiment.recipes.LR_SCHEDULES", LR_SCHEDULES),
    ]


def _public_name(obj: Any) -> str | None:
    """Where ``obj`` has a page in the API reference: its name in a package's ``__all__``."""
    for package in ("pyrovae.model", "pyrovae.guides", "pyrovae.inference"):
        module = importlib.import_module(package)
        for name in module.__all__:
            if getattr(module, name) is obj:
                return f"{package}.{name}"
    return None


def _type_name(hint: Any) -> str:
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "").replace("NoneType", "None")


def _toml(value: Any) -> str:
    """A value as it is written in a spec."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if value is None:
        return "unset"
    return repr(value)


def _literal(value: Any) -> str:
    return "``" + _toml(value).replace("`", "'") + "``"


def _choices() -> dict[tuple[type, str], tuple[str, ...]]:
    """Keys whose value is one of a fixed set of words, with the set the spec checks."""
    from pyrovae.inference.algorithms.compiled import COMPILE_MODES
    from pyrovae.inference.experiment import spec
    from pyrovae.model.networks import INITS

    return {
        (spec.ModelSpec, "hierarchy"): tuple(spec.HIERARCHIES),
        (spec.ModelSpec, "labels"): tuple(spec.LABEL_USES),
        (spec.ModelSpec, "init"): tuple(INITS),
        (spec.TrainSpec, "compile"): ("true", "false", *COMPILE_MODES),
    }


def _summary(obj: Any) -> str:
    doc = inspect.getdoc(obj) or ""
    return " ".join(doc.split("\n\n")[0].split())


def _table(header: list[str], rows: list[list[str]], widths: str | None = None) -> list[str]:
    lines = [".. list-table::", "   :header-rows: 1", ""]
    for row in [header, *rows]:
        lines.append(f"   * - {row[0] or ' '}")
        lines.extend(f"     - {cell or ' '}" for cell in row[1:])
    return [*lines, ""]


def spec_reference() -> list[str]:
    """The spec's sections and registries as reStructuredText."""
    from pyrovae.inference.experiment.build import options_of, schema

    out: list[str] = []
    choices = _choices()
    for title, cls in _sections():
        out += [title, "^" * len(title), ""]
        hints = typing.get_type_hints(cls)
        rows = []
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = None
            limit = f.metadata.get("range")
            words = choices.get((cls, f.name))
            if words:
                allowed = ", ".join(f"``{w}``" for w in words)
            elif limit is not None and str(limit):
                allowed = f"``{str(limit).strip()}``"
            else:
                allowed = ""
            rows.append(
                [
                    f"``{f.name}``",
                    f"``{_type_name(hints[f.name])}``",
                    "unset" if default is None else _literal(default),
                    allowed,
                ]
            )
        out += _table(["key", "type", "default", "allowed"], rows)
    for where, registry_name, registry in _registries():
        title = f"``{where}``: ``kind``"
        out += [title, "^" * len(title), ""]
        out += [f"The registry :py:obj:`{registry_name}`.", ""]
        rows = []
        for kind, constructor in registry.items():
            params = schema(constructor)
            options = []
            for name in options_of(constructor):
                default = params[name].default
                options.append(
                    f"``{name}``"
                    + ("" if default is inspect.Parameter.empty else f" = {_literal(default)}")
                )
            public = _public_name(constructor)
            made_by = (
                f":py:obj:`~{public}`"
                if public
                else f"``{constructor.__module__}.{constructor.__qualname__}``"
            )
            rows.append(
                [
                    f"``{kind}``",
                    made_by,
                    ", ".join(options) or "(none)",
                    _summary(constructor),
                ]
            )
        out += _table(["kind", "constructor", "options (defaults)", "what it is"], rows)
    return out
