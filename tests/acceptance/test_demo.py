"""The README's first command: ``python -m celery_unique demo`` runs and shows both locks."""

from __future__ import annotations

import re
import string
import subprocess
import sys

import pytest

from .conftest import ROOT

pytestmark = pytest.mark.acceptance


def test_demo_runs_and_shows_both_locks() -> None:
    done = subprocess.run([sys.executable, "-m", "celery_unique", "demo"], cwd=ROOT,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr  # nor at exit, as results go
    summary = re.search(r"(\d+) queued, (\d+) rejected as duplicates, (\d+) ran", done.stdout)
    assert summary, done.stdout
    queued, rejected, ran = map(int, summary.groups())
    assert queued + rejected == 30 and rejected > 0 and ran == queued
    assert f'lock="{{path}}"  {string.ascii_lowercase}' in done.stdout
