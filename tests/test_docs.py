"""The documentation's reference pages cover the code, checked without building the site.

Every public name (each package's ``__all__``) has an entry in the API reference's
autosummary lists, from which Sphinx generates one page per name; the spec reference, which
the docs' own extension generates from the registries, names every kind of every registry;
and every page of ``docs/`` is reachable from a table of contents.
"""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PACKAGES = ("pyrovae.model", "pyrovae.guides", "pyrovae.inference")


def autosummary_entries(page: Path) -> tuple[str, list[str]]:
    """The ``currentmodule`` of an API page and the names its autosummary lists."""
    text = page.read_text()
    (module,) = re.findall(r"^\.\. currentmodule:: (\S+)$", text, flags=re.M)
    block = text.split(".. autosummary::", 1)[1].split("```", 1)[0]
    names = [
        line.strip()
        for line in block.splitlines()
        if line.startswith("   ") and line.strip() and not line.strip().startswith(":")
    ]
    return module, names


@pytest.mark.parametrize("package", PACKAGES)
def test_every_public_name_has_a_reference_entry(package):
    page = DOCS / "api" / f"{package.rsplit('.', 1)[1]}.md"
    module, names = autosummary_entries(page)
    assert module == package
    public = importlib.import_module(package).__all__
    missing = sorted(set(public) - set(names))
    extra = sorted(set(names) - set(public))
    assert not missing, f"{page.relative_to(ROOT)} lacks {missing}"
    assert not extra, f"{page.relative_to(ROOT)} lists names outside __all__: {extra}"
    assert len(names) == len(set(names))


def test_the_spec_reference_names_every_kind():
    sys.path.insert(0, str(DOCS / "_ext"))
    try:
        import spec_reference  # plain Python; the Sphinx directive wraps it
    finally:
        sys.path.remove(str(DOCS / "_ext"))
    text = "\n".join(spec_reference.spec_reference())
    for where, _, registry in spec_reference._registries():
        assert f"``{where}``: ``kind``" in text
        for kind in registry:
            assert f"* - ``{kind}``" in text, (where, kind)
    for section in ("[data]", "[model]", "[[model.layers]]", "[guide]", "[train]"):
        assert section in text


def test_the_command_line_reference_is_generated_from_the_parser():
    text = (DOCS / "guide" / "cli.md").read_text()
    assert ".. argparse::" in text
    assert ":module: pyrovae.inference.cli.parser" in text
    assert ":func: build_parser" in text


def test_every_page_is_in_a_table_of_contents():
    pages = {
        p.relative_to(DOCS).with_suffix("").as_posix()
        for p in DOCS.rglob("*.md")
        if not p.relative_to(DOCS).parts[0].startswith(("_", "jupyter_execute"))
        and "generated" not in p.parts
    }
    listed = {"index"}
    for page in DOCS.rglob("*.md"):
        for block in re.findall(r"```\{toctree\}\n(.*?)```", page.read_text(), flags=re.S):
            for line in block.splitlines():
                entry = line.strip()
                if entry and not entry.startswith(":"):
                    base = page.parent.relative_to(DOCS)
                    listed.add((base / entry).as_posix().removeprefix("./"))
    assert pages <= listed, sorted(pages - listed)


def test_tutorials_are_executed_notebooks():
    for page in sorted((DOCS / "tutorials").glob("*.md")):
        text = page.read_text()
        assert text.startswith("---\njupytext:"), page.name
        assert "kernelspec:" in text.split("---", 2)[1], page.name
        assert "```{code-cell} ipython3" in text, page.name
        assert "matplotlib.use(" not in text, page.name
    conf = (DOCS / "conf.py").read_text()
    assert 'nb_execution_mode = "force"' in conf
    assert "nb_execution_raise_on_error = True" in conf
