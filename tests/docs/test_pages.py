"""Every code block of the quickstart, the how-tos, the recipes and the migration guides
is code a test runs: an included example (``docs/examples``, run by test_examples.py) or
a test file, or a shell command that test_commands.py runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from .conftest import EXAMPLES

DOCS = EXAMPLES.parent
ROOT = DOCS.parent
PAGES = sorted([DOCS / "quickstart.rst", *DOCS.glob("howto/*.rst"),
                *DOCS.glob("recipes/*.rst"), *DOCS.glob("migrate/*.rst")])


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(DOCS).as_posix())
def test_every_code_block_is_run_by_a_test(page: Path) -> None:
    text = page.read_text()
    # A paragraph ending in "::" starts a literal block nobody runs.
    literal = [line for line in text.splitlines()
               if line.rstrip().endswith("::") and not line.lstrip().startswith("..")]
    assert literal == [], f"literal blocks in {page.name}: use a literalinclude"
    languages = re.findall(r"^\s*\.\. code-block:: (\w+)", text, re.M)
    assert set(languages) <= {"console"}, f"{page.name}: code-blocks {languages}"
    for block in re.findall(r"^\s*\.\. code-block:: console\n\n((?:\s+.*\n)+)", text, re.M):
        for line in block.strip().splitlines():
            line = line.strip().removeprefix("$ ")
            # The quickstart's worker: started as printed by tests/acceptance/test_quickstart.
            assert line.startswith(("celery -A proj unique ", "pip install ",
                                    "celery -A tasks worker ")) or (
                not line.startswith("celery")), f"{page.name}: {line}"
    for target in re.findall(r"^\s*\.\. literalinclude:: (\S+)", text, re.M):
        path = (page.parent / target).resolve()
        assert path.exists(), f"{page.name}: {target}"
        assert path.is_relative_to(EXAMPLES) or path.is_relative_to(ROOT / "tests"), target
