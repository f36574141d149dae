"""Sphinx extension of the pyrovae docs: the ``pyrovae-spec`` directive.

``.. pyrovae-spec::`` (in MyST, inside an ``{eval-rst}`` block) renders the spec reference
that :mod:`spec_reference` generates from the spec's dataclasses and the registries.
"""

from __future__ import annotations

from typing import Any

from docutils import nodes
from docutils.statemachine import StringList
from spec_reference import spec_reference
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles


class SpecReference(SphinxDirective):
    """``.. pyrovae-spec::`` (in MyST, inside ``{eval-rst}``): the generated spec reference."""

    has_content = False

    def run(self) -> list[nodes.Node]:
        container = nodes.section()
        container.document = self.state.document
        lines = spec_reference()
        nested_parse_with_titles(self.state, StringList(lines, source="pyrovae-spec"), container)
        return container.children


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("pyrovae-spec", SpecReference)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
