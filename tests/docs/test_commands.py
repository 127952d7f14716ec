"""The how-tos' shell commands, run as written against their example project."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from celery_unique.testing import RedisServer

from .conftest import EXAMPLES

DOCS = EXAMPLES.parent
PAGES = sorted([*DOCS.glob("howto/*.rst"), *DOCS.glob("recipes/*.rst")])


def commands(page: Path) -> list[str]:
    """The ``$ celery -A proj unique ...`` lines of a page's console blocks."""
    return [m.group(1) for m in re.finditer(r"^\s+\$ (celery -A proj unique .*)$",
                                           page.read_text(), re.M)]


@pytest.mark.parametrize("page", [p for p in PAGES if commands(p)],
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_a_pages_commands_run(page: Path, unique_redis_server: RedisServer) -> None:
    url = f"{unique_redis_server.url}/9"
    client = redis.Redis.from_url(url)
    client.flushdb()
    # The example project names the Redis a project would use; CELERY_BROKER_URL (read
    # by Celery before its settings) points it, and the locks with it, at the tests' own.
    env = {**os.environ, "CELERY_BROKER_URL": url, "PYTHONPATH": str(EXAMPLES)}

    def run(line: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", *shlex.split(line)]
        if argv[6] in ("release", "clear") and "--yes" not in argv:
            argv.append("--yes")  # the page's command asks first; a test has no terminal
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)

    lines = commands(page)
    # The lock the page's release names exists: queued by the page's own defer.
    for line in [*[x for x in lines if "send_report --kwargs" in x], *lines]:
        done = run(line)
        assert done.returncode == 0, f"{line}\n{done.stdout}{done.stderr}"
        assert "Traceback" not in done.stderr
    client.flushdb()
