"""The how-tos' examples that enqueue, run as a reader runs them: a caller process that
imports the example and calls it, then a real prefork worker (``celery -A proj worker``)
on a private Redis, the broker and the lock store. ``tests/docs`` runs the same examples
fast, in memory; this is the same code against the real thing."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from celery_unique.keys import registry_key
from celery_unique.testing import RedisServer, wait_for

from .conftest import ROOT

pytestmark = pytest.mark.acceptance

EXAMPLES = ROOT / "docs" / "examples"
MODULES = ["pdf_report", "in_order", "per_arguments", "queued_and_running",
           "unique_enqueue", "one_at_a_time", "fencing", "options"]

#: What the caller does, before any worker runs: each example's calls, duplicates too.
CALLER = '''
import json, sys
from celery_unique import AlreadyQueued
import pdf_report, in_order, per_arguments, queued_and_running, unique_enqueue
import one_at_a_time, fencing, options

out = {}
out["reports"] = [pdf_report.request_report(e) for e in
                  ("alice@example.com", "alice@example.com", "bob@example.com")]
in_order.write_alphabet(sys.argv[1])
per_arguments.rebuild_profile.delay(7, reason="signup")
try:
    per_arguments.rebuild_profile.delay(7, reason="email changed")
    out["profile"] = "queued twice"
except AlreadyQueued:
    out["profile"] = "refused"
queued_and_running.sync.delay("acme")
try:
    queued_and_running.sync.delay("acme")
    out["sync"] = "queued twice"
except AlreadyQueued:
    out["sync"] = "refused"
unique_enqueue.schedule_cleanup()
unique_enqueue.schedule_cleanup()
one_at_a_time.import_feed.delay("https://example.com/feed.xml")
fencing.rebuild.delay("acme", "v1")  # its accounts.db: in the working directory
options.examples()
print(json.dumps(out))
'''


def _rows(db: Path) -> list[Any]:
    if not db.exists():
        return []
    with sqlite3.connect(db) as conn:
        try:
            return [tuple(r) for r in conn.execute("SELECT name, data FROM accounts")]
        except sqlite3.OperationalError:  # created, its table not yet
            return []


@pytest.fixture
def project(unique_redis_server: RedisServer) -> Iterator[dict[str, str]]:
    """The environment a reader's shell would have: the examples on the path, the Redis
    the project names (here database 11 of the private server)."""
    url = f"{unique_redis_server.url}/11"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield {**os.environ, "PYTHONPATH": f"{EXAMPLES}{os.pathsep}{ROOT}",
           "CELERY_BROKER_URL": url, "PROJ_DONE_URL": url}
    client.flushdb()


def test_the_examples_run_against_a_real_worker(project: dict[str, str]) -> None:
    here = Path(tempfile.mkdtemp(prefix="celery-unique-examples-"))  # the reader's folder
    path = here / "alphabet.txt"
    called = subprocess.run([sys.executable, "-c", CALLER, str(path)], cwd=here,
                            env=project, capture_output=True, text=True, timeout=60)
    assert called.returncode == 0, called.stderr
    out = json.loads(called.stdout)
    assert out["reports"] == ["Your report will be in your inbox in a minute.",
                              "Your report is already on its way.",
                              "Your report will be in your inbox in a minute."]
    assert out["profile"] == "refused" and out["sync"] == "refused"

    log = path.parent / "worker.log"
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "proj", "worker", "-P", "prefork", "-c", "4",
         "-l", "INFO", "--without-gossip", "--without-mingle", "--without-heartbeat",
         "-I", ",".join(MODULES), f"--logfile={log}"],
        cwd=here, env=project, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        start_new_session=True)
    client = redis.Redis.from_url(project["CELERY_BROKER_URL"])

    def done() -> list[Any]:
        return [tuple(json.loads(x)) for x in client.lrange("done", 0, -1)]

    try:
        wait_for(lambda: path.exists() and len(path.read_text()) == 26, timeout=90,
                 what="the alphabet")
        wait_for(lambda: len(done()) == 6, timeout=30, what="the six jobs' work")
        wait_for(lambda: _rows(here / "accounts.db") == [("acme", "v1")], timeout=30,
                 what="the fenced write")
        assert path.read_text() == "abcdefghijklmnopqrstuvwxyz"  # in order, 4 processes
        assert sorted(map(str, done())) == sorted(map(str, [
            ("report sent", "alice@example.com"), ("report sent", "bob@example.com"),
            ("synced", "user-7"), ("synced", "acme"), ("cleaned", None),
            ("feed imported", "https://example.com/feed.xml")]))
        assert "ERROR" not in log.read_text(), log.read_text()
    finally:
        worker.terminate()
        worker.wait(30)
    # Every lock released: left are fence counters, ended runs and the sweepers' schedule
    # (a lock's entry goes when it is next due, a lease after its last parked job).
    assert not [k for k in client.scan_iter("celery_unique:*") if not k.endswith(
        (b":seq", b":ran")) and k.decode() != registry_key("celery_unique")]
