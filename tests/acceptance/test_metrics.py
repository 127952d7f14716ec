"""Metrics against a real prefork worker: what was recorded, in every process, is what
happened (duplicates, a line of 20 ordered jobs, a killed pool process, a store blip)."""

from __future__ import annotations

import json
import tempfile
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from celery_unique import AlreadyQueued, LockStoreUnavailable
from celery_unique.testing import RedisServer, wait_for

from .conftest import Worker

pytestmark = pytest.mark.acceptance


def totals(folder: Path) -> Counter[tuple[str, frozenset[tuple[str, Any]]]]:
    """Each series' total over every process: a counter's sum, a histogram's count."""
    found: Counter[tuple[str, frozenset[tuple[str, Any]]]] = Counter()
    for path in folder.glob("*.json"):
        for point in json.loads(path.read_text() or "[]"):
            found[point["name"], frozenset(point["attributes"].items())] += point["value"]
    return found


def total(found: Counter[Any], name: str, **attributes: str) -> int:
    """The sum over the series of ``name`` that carry ``attributes``."""
    wanted = {(k.replace("__", "."), v) for k, v in attributes.items()}
    return sum(v for (n, a), v in found.items() if n == name and wanted <= a)


@pytest.fixture
def folder() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="celery-unique-metrics-") as path:
        yield Path(path)


def test_a_real_worker_records_what_happened(
    unique_redis_server: RedisServer, folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lock_store = RedisServer("--appendonly", "yes", "--appendfsync", "always").start()
    env = {"CELERY_UNIQUE_TEST_REDIS": unique_redis_server.url,
           "CELERY_UNIQUE_TEST_METRICS": str(folder),
           "CELERY_UNIQUE_TEST_STORE_URL": f"{lock_store.url}/0"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    from tests.acceptance import metrics_app as m

    run = uuid.uuid4().hex[:10]
    m.app.conf.unique_redis_url = env["CELERY_UNIQUE_TEST_STORE_URL"]
    worker = Worker(unique_redis_server, concurrency=4, name=f"metered-{run}",
                    queues="metered", app="tests.acceptance.metrics_app", env=env)
    try:
        worker.wait_ready()
        # Duplicates: three jobs, each enqueued twice (a second's countdown: the worker
        # cannot start one, which frees its queueing lock, before its duplicate is sent).
        firsts = [m.unique.apply_async((f"{run}-{i}",), countdown=1) for i in range(3)]
        for i in range(3):
            with pytest.raises(AlreadyQueued):
                m.unique.delay(f"{run}-{i}")
        # A line of 20 jobs on one lock.
        line = [m.ordered.delay(run, n) for n in range(20)]
        assert [r.get(timeout=60) for r in firsts + line] == [
            f"{run}-{i}" for i in range(3)] + list(range(20))
        ran = redis.Redis.from_url(f"{unique_redis_server.url}/4").lrange(f"metered:{run}",
                                                                           0, -1)
        assert [int(n) for n in ran] == list(range(20))  # in creation order
        # A pool process killed while it holds its lock: the main process releases it.
        m.killed.delay(run)
        wait_for(lambda: "WorkerLostError" in worker.logs(), timeout=30,
                 what="the pool process to be lost")
        # Its main process then releases the lock (after saying so): before the blip.
        holders = redis.Redis.from_url(env["CELERY_UNIQUE_TEST_STORE_URL"])
        wait_for(lambda: not holders.exists(f"celery_unique:l:{{kill_{run}}}:holders"),
                 timeout=30, what="the killed job's lock to be released")
        # A store blip: the caller is refused, the worker's job is published again until
        # the store is back.
        lock_store.kill()
        with pytest.raises(LockStoreUnavailable):
            m.blip.delay(run)
        waits = m.app.send_task("metered.blip", (run,))  # by name: no lock taken here
        wait_for(lambda: "published again to run in" in worker.logs(), timeout=30,
                 what="the job to meet the outage")
        wait_for(lambda: "sweeping the locks failed" in worker.logs(), timeout=30,
                 what="the sweep to meet the outage")
        lock_store.start()
        assert waits.get(timeout=60) == run

        seen: list[Counter[Any]] = [Counter()]

        def recorded() -> bool:
            seen[0] = found = totals(folder)
            return total(found, "celery_unique.lock.acquired") >= 22 and total(
                found, "celery_unique.lock.released") >= 22

        try:
            wait_for(recorded, timeout=15, what="every process's readings")
        except TimeoutError:
            raise AssertionError(f"readings so far: {seen[0]}\n{worker.logs()}") from None
        found = seen[0]
    finally:
        worker.stop()
        lock_store.stop()

    q = "celery_unique.queueing_lock."
    assert total(found, q + "taken", celery_unique__template="u_{token}") == 3
    assert total(found, q + "refused", celery_unique__action="raised") == 3
    assert total(found, q + "released", celery_unique__reason="started") == 3

    line_of = {"celery_unique.template": "line_{run}"}
    lock = "celery_unique.lock."
    assert total(found, lock + "acquired", **_kw(line_of)) == 20
    assert total(found, lock + "released", celery_unique__reason="success",
                 **_kw(line_of)) == 20
    assert total(found, lock + "held", **_kw(line_of)) == 20
    assert total(found, lock + "wait", **_kw(line_of)) == 20
    parked = total(found, lock + "waited", celery_unique__action="parked", **_kw(line_of))
    handed = total(found, lock + "handed_over", **_kw(line_of))
    assert parked >= 10  # four pool processes, 20 jobs of one lock: most wait in line
    assert handed == parked  # each parked job was handed the lock once...
    assert total(found, lock + "handover", **_kw(line_of)) == parked  # ...and started

    killed = {"celery_unique.template": "kill_{run}"}
    assert total(found, lock + "acquired", **_kw(killed)) == 1
    assert total(found, lock + "released", celery_unique__reason="killed", **_kw(killed)) == 1

    blip = {"celery_unique.template": "blip_{run}"}
    errors = "celery_unique.store.errors"
    assert total(found, errors, celery_unique__where="enqueue",
                 celery_unique__action="raised") == 1
    assert total(found, errors, celery_unique__where="acquire",
                 celery_unique__action="requeued", **_kw(blip)) >= 1
    assert total(found, errors, celery_unique__where="sweep") >= 1
    assert total(found, lock + "acquired", **_kw(blip)) == 1
    assert total(found, lock + "lost") == 0


def _kw(attributes: dict[str, str]) -> dict[str, str]:
    return {k.replace(".", "__"): v for k, v in attributes.items()}
