"""Sphinx configuration: `make docs` builds the site offline, warnings as errors."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "_ext"))

project = "pyrovae"
author = "the pyrovae authors"
copyright = "pyrovae authors"

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinxarg.ext",
    "pyrovae_docs",
]

source_suffix = {".rst": "restructuredtext", ".md": "myst-nb"}
exclude_patterns = ["_build", "jupyter_execute", "**/.ipynb_checkpoints"]
html_theme = "furo"
html_title = "pyrovae"
# Nothing is fetched when the site is built or read: no intersphinx, no remote assets.
html_static_path: list[str] = []

autosummary_generate = True
autodoc_default_options = {"members": True}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
napoleon_google_docstring = True
napoleon_numpy_docstring = False

myst_enable_extensions = ["colon_fence", "dollarmath"]
myst_heading_anchors = 3
# The included results page of the reproductions starts its subsections at level 3.
suppress_warnings = ["myst.header"]

# Tutorials are executed at every build; an error in a cell fails the build.
nb_execution_mode = "force"
nb_execution_timeout = 600
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_merge_streams = True
nb_ipywidgets_js: dict = {}


def _own_docstring(app, what, name, obj, options, lines):
    """A registry or site name re-exported by a package is documented with the docstring
    written under its assignment in its own module, not that of its type (dict, str)."""
    import inspect

    from sphinx.pycode import ModuleAnalyzer

    if what != "data" or "\n".join(lines).strip() != (inspect.getdoc(type(obj)) or "").strip():
        return
    package = name.rsplit(".", 1)[0]
    for modname, module in sorted(sys.modules.items()):
        if not modname.startswith(package + ".") or module is None:
            continue
        for attr, value in list(vars(module).items()):
            if value is obj:
                docs = ModuleAnalyzer.for_module(modname).find_attr_docs().get(("", attr))
                if docs:
                    lines[:] = list(docs)
                    return
    lines[:] = []


def setup(app):
    app.connect("autodoc-process-docstring", _own_docstring)
