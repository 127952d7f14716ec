"""The reference is generated from docstrings: every public name has one, and the
reference page pulls in every public module."""

from __future__ import annotations

import importlib
import inspect

import pytest

from .conftest import EXAMPLES

REFERENCE = (EXAMPLES.parent / "reference.rst").read_text()
MODULES = ["celery_unique.admin", "celery_unique.compat", "celery_unique.testing",
           "celery_unique.signals"]


@pytest.mark.parametrize("module", ["celery_unique", *MODULES])
def test_every_public_name_has_a_docstring(module: str) -> None:
    mod = importlib.import_module(module)
    for name in mod.__all__:
        obj = getattr(mod, name)
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue  # data (signals, aliases): documented by their #: comments
        own = obj.__dict__.get("__doc__") if inspect.isclass(obj) else obj.__doc__
        assert own and own.strip(), f"{module}.{name} has no docstring"


def test_the_reference_pulls_in_every_public_name() -> None:
    for module in MODULES:
        assert f".. automodule:: {module}\n   :members:\n" in REFERENCE, module
    import celery_unique

    for name in celery_unique.__all__:
        assert (f".. autoclass:: celery_unique.{name}" in REFERENCE
                or f".. py:data:: celery_unique.{name}" in REFERENCE), name
