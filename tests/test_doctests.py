"""Every docstring example of the package runs as a doctest.

The modules are imported by their installed names (``pyrovae.model.vae``, ...), never by
path, so that each is loaded once; the command's ``__main__`` module is left out, as importing
it runs the command.
"""

from __future__ import annotations

import doctest
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "guides", "inference")


def module_names() -> list[str]:
    names = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path.name == "__main__.py":
                continue
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            names.append(".".join(("pyrovae", *parts)))
    return names


def examples() -> list[doctest.DocTest]:
    finder = doctest.DocTestFinder(exclude_empty=True)
    found = []
    for name in module_names():
        module = importlib.import_module(name)
        for test in finder.find(module, name):
            # A re-exported object is collected in the module that defines it, once.
            defined_here = test.filename is not None and Path(test.filename) == Path(
                module.__file__
            )
            if test.examples and defined_here:
                found.append(test)
    return sorted(found, key=lambda t: t.name)


EXAMPLES = examples()


def test_the_package_has_docstring_examples():
    assert len(EXAMPLES) >= 10


@pytest.mark.parametrize("test", EXAMPLES, ids=[t.name for t in EXAMPLES])
def test_docstring_example(test: doctest.DocTest):
    runner = doctest.DocTestRunner(
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False
    )
    report: list[str] = []
    test.globs = dict(test.globs)  # each example starts from its module's names alone
    result = runner.run(test, out=report.append)
    assert result.failed == 0, "".join(report)
