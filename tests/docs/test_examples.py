"""Every how-to's code, run: the examples in ``docs/examples`` that the pages include."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from celery.beat import ScheduleEntry, Scheduler

from celery_unique import LockHeld
from celery_unique.testing import UniqueLocks, wait_for
from celery_unique.wire import ParkedMessage

from .conftest import services


def test_pdf_report(example: Any, unique: UniqueLocks, published: list[str]) -> None:
    pdf = example("pdf_report")
    assert pdf.request_report("alice@example.com").startswith("Your report will be")
    assert pdf.request_report("alice@example.com") == "Your report is already on its way."
    assert pdf.request_report("bob@example.com").startswith("Your report will be")
    assert len(published) == 2
    assert [lock.value for lock in unique.locks()] != []
    unique.release_all()
    unique.eager()
    pdf.send_pdf_report.delay("carol@example.com")
    assert services.done == [("report sent", "carol@example.com")]


def test_unique_enqueue(example: Any, unique: UniqueLocks, published: list[str]) -> None:
    mod = example("unique_enqueue")
    mod.schedule_cleanup()
    mod.schedule_cleanup()  # ignored: one is waiting
    assert len(published) == 1
    assert [lock.value for lock in unique.locks()] == ["maintenance"]
    mod.my_task.delay()
    with unique.raises_duplicate() as caught:
        mod.my_task.delay()
    assert caught[0].key.endswith(":my_lock_value_aaa}")
    mod.my_task.delay(param_1="bbb")


def test_one_at_a_time(example: Any, unique: UniqueLocks, monkeypatch: Any) -> None:
    mod = example("one_at_a_time")
    unique.eager()
    url = "https://example.com/feed.xml"
    during: list[Any] = []

    def importing(feed_url: str) -> str:  # a second import while this one runs
        during.append(mod.import_feed.delay(feed_url))
        return feed_url

    monkeypatch.setattr(mod, "import_feed_now", importing)
    assert mod.import_feed.delay(url).get() == url
    assert during[0].state == "REVOKED"
    with pytest.raises(LockHeld):
        during[0].get()
    assert unique.locks() == []


def test_in_order(example: Any, unique: UniqueLocks, tmp_path: Path) -> None:
    mod = example("in_order")
    unique.eager()
    path = tmp_path / "alphabet.txt"
    mod.write_alphabet(str(path))
    assert path.read_text() == "abcdefghijklmnopqrstuvwxyz"
    assert unique.locks() == []


def test_per_arguments(example: Any, unique: UniqueLocks, monkeypatch: Any,
                       published: list[str]) -> None:
    mod = example("per_arguments")
    mod.rebuild_profile.delay(1, "signup")
    with unique.raises_duplicate():
        mod.rebuild_profile.delay(1, "manual")  # the same user: one queued at most
    mod.rebuild_profile.delay(2)
    assert len(published) == 2
    unique.release_all()
    unique.eager()
    during: list[Any] = []

    def charging(user_id: int, amount: int) -> None:
        if not during:
            during.append(mod.process_payment.delay(user_id, amount))  # the same: skipped
            during.append(mod.process_payment.delay(user_id, amount + 1))  # another: runs
        services.done.append(("charged", (user_id, amount)))

    monkeypatch.setattr(mod, "charge_card", charging)
    mod.process_payment.delay(7, 100)
    assert [r.state for r in during] == ["REVOKED", "SUCCESS"]
    assert services.done == [("charged", (7, 101)), ("charged", (7, 100))]


def test_queued_and_running(example: Any, unique: UniqueLocks) -> None:
    mod = example("queued_and_running")
    mod.sync.delay("acme")
    with unique.raises_duplicate() as caught:
        mod.sync.delay("acme")
    assert "sync_acme" in caught[0].key
    mod.sync.delay("globex")
    assert len(unique.locks(kind="queueing")) == 2


def test_beat(example: Any, unique: UniqueLocks, published: list[str],
              caplog: pytest.LogCaptureFixture) -> None:
    mod = example("beat")
    assert "cleanup-every-minute" in mod.app.conf.beat_schedule
    scheduler = Scheduler(mod.app, lazy=True)
    entry = ScheduleEntry(name="cleanup-every-minute", task="proj.cleanup", schedule=60,
                          app=mod.app)
    with caplog.at_level(logging.INFO):
        first = scheduler.apply_async(entry, advance=False)
        second = scheduler.apply_async(entry, advance=False)  # not a scheduling error
    assert second.id == first.id and len(published) == 1
    assert "from beat" in caplog.text


def test_django(published: list[str], caplog: pytest.LogCaptureFixture,
                monkeypatch: pytest.MonkeyPatch) -> None:
    # Only for this test: Celery turns its Django fix-up on for every app (and every
    # subprocess) while DJANGO_SETTINGS_MODULE is set.
    monkeypatch.setenv("DJANGO_SETTINGS_MODULE", "djproj.settings")
    import django
    from django.db import transaction

    django.setup()
    from celery_unique.settings import setting
    from djproj import tasks
    from djproj.celery import app

    app.conf.broker_url = "memory://"  # the settings' Redis is never touched here
    assert setting(app, "unique_queueing_lock_timeout") == 600  # CELERY_UNIQUE_*
    with UniqueLocks(app) as unique:
        with transaction.atomic():
            tasks.request_export(7)
            assert published == []  # not before the commit
        assert len(published) == 1
        [lock] = unique.locks()
        assert lock.ttl is not None and 590 < lock.ttl <= 600
        with caplog.at_level(logging.INFO), transaction.atomic():
            tasks.request_export(7)
        assert len(published) == 1 and "already queued" in caplog.text


def test_options(example: Any, unique: UniqueLocks) -> None:
    # Celery reads task_annotations once; other examples made the app read it already.
    unique.app.__dict__.pop("annotations", None)
    mod = example("options")
    mod.examples()
    values = sorted(lock.value for lock in unique.locks())
    assert values == ["maintenance", "nightly", "sync-all"]
    assert mod.sync._unique_defaults.queueing_lock_timeout == 600  # task_annotations


def test_fencing(example: Any, unique: UniqueLocks, tmp_path: Path) -> None:
    import sqlite3

    mod = example("fencing")
    mod.DB = str(tmp_path / "accounts.db")  # the sample makes its table itself
    unique.eager()
    assert mod.rebuild.delay("acme", "v1").get() == "written"
    assert mod.rebuild.delay("acme", "v2").get() == "written"  # a later fence: allowed
    with sqlite3.connect(mod.DB) as db:
        db.execute("UPDATE accounts SET fence = fence + 1000000000000000")  # a later holder wrote
    assert mod.rebuild.delay("acme", "v3").get() == "stale"
    with sqlite3.connect(mod.DB) as db:
        assert db.execute("SELECT data FROM accounts").fetchone() == ("v2",)


def test_release_stuck(example: Any, unique: UniqueLocks) -> None:
    mod = example("release_stuck")
    base = "celery_unique:l:{printer}"
    store = unique.store
    store.acquire_lock(base, token="holder", limit=1, lease_ms=500, mode="order",
                       wait_ms=60_000)
    store.acquire_lock(base, token="next", limit=1, lease_ms=60_000, mode="order",
                       wait_ms=60_000)  # waits in line
    message = json.dumps({"headers": {"task": "proj.print", "id": "next"},
                          "properties": {"delivery_tag": "next.cu"}})
    store.park(base, token="next", limit=1, lease_ms=60_000,
               message=ParkedMessage("printing", message).encode())
    assert mod.release_dead_holders() == []  # alive: left alone
    # Its worker dies: nothing renews the lease, which runs out.
    wait_for(lambda: "lease expired" in unique.locks()[0].holder_status(), timeout=5,
             what="the holder's lease to run out")
    assert mod.release_dead_holders() == [base]
    [lock] = unique.locks()  # the first in line was handed the lock and published
    assert lock.holders == ("next",) and lock.waiting == 0
    assert unique.client.llen("printing") == 1


def test_connections() -> None:
    from celery import Celery

    from celery_unique.store import get_store

    mod = __import__("connections")
    tls = Celery("tls", set_as_current=False)
    mod.use_tls(tls)
    pool = get_store(tls).client.connection_pool  # built, not connected
    assert pool.connection_class.__name__ == "SSLConnection"
    assert pool.connection_kwargs["ssl_ca_certs"] == "/etc/ssl/redis-ca.pem"
    sentinel = Celery("sentinel", set_as_current=False)
    mod.use_sentinel(sentinel)
    pool = get_store(sentinel).client.connection_pool
    assert pool.service_name == "mymaster"
    assert [s.connection_pool.connection_kwargs["host"]
            for s in pool.sentinel_manager.sentinels] == ["s1", "s2"]
    own = Celery("own", set_as_current=False)
    mod.use_a_client_of_your_own(own)
    assert get_store(own).client.connection_pool.connection_kwargs["host"] == "redis.internal"


def test_migrate_once(example: Any, unique: UniqueLocks, published: list[str]) -> None:
    mod = example("migrate_once")
    first = mod.slow_task.delay(1)
    assert mod.slow_task.delay(1, force=True).state == "REJECTED"  # graceful; keys=user_id
    assert first.id and len(published) == 1
    assert mod.send(9) == "queued"
    assert mod.send(9).startswith("already queued: Expires in 3")


def test_migrate_singleton(example: Any, unique: UniqueLocks) -> None:
    mod = example("migrate_singleton")
    task1 = mod.do_something.delay(username="bob", otherarg=99)
    task2 = mod.do_something.delay(username="bob", otherarg=100)
    assert task1 == task2
    first = mod.start_import("alice")
    assert mod.start_import("alice") == f"a duplicate of task {first}"
    [ttl] = [lock.ttl for lock in unique.locks() if "do_something" in lock.key]
    assert ttl is not None and 59 < ttl <= 60
    mod.unlock_all()
    assert unique.locks() == []


def test_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    """The prefork recipe: a provider per process, its series its own."""
    import io
    import os

    from celery import Celery
    from opentelemetry.sdk.metrics.export import ConsoleMetricExporter

    from celery_unique import UniqueTask
    from celery_unique.testing import UniqueLocks

    mod = __import__("metrics")
    out = io.StringIO()
    monkeypatch.setattr(mod, "exporter", lambda: ConsoleMetricExporter(out=out))
    app = Celery("metered", set_as_current=False)
    mod.turn_on(app)

    @app.task(base=UniqueTask, lock="m", shared=False)
    def job() -> None: ...

    with UniqueLocks(app):
        job.apply()
    from celery_unique.state import app_state

    made = app_state(app).metrics.instruments()  # this process's: made by provider()
    assert made is app_state(app).metrics.instruments()  # once per process
    made.provider.force_flush()
    exported = json.loads(out.getvalue())["resource_metrics"][0]
    assert exported["resource"]["attributes"]["service.instance.id"].endswith(
        f"-{os.getpid()}")
    names = [m["name"] for m in exported["scope_metrics"][0]["metrics"]]
    assert "celery_unique.lock.acquired" in names


def test_throttle(example: Any, unique: UniqueLocks) -> None:
    from celery_unique import AlreadyQueued

    mod = example("throttle")
    unique.eager()
    mod.send_digest.delay(7)
    assert services.done == [("digest sent", 7)]
    with pytest.raises(AlreadyQueued):  # the job ran and ended: the hour is not over
        mod.send_digest.delay(7)
    [lock] = unique.locks()
    assert lock.ttl is not None and 3599 < lock.ttl <= 3600


def test_replace(example: Any, unique: UniqueLocks, published: list[str]) -> None:
    mod = example("replace")
    first = mod.reindex.delay(7, 1)
    second = mod.reindex.delay(7, 2)  # replaces the first: both are published
    assert published == [mod.reindex.name] * 2
    [lock] = unique.locks()
    assert lock.value == "index_7" and lock.holders == (second.id,) != (first.id,)
    unique.release_all()
    unique.eager()
    mod.reindex_latest.delay(7, 3)
    assert services.done == [("index rebuilt", [7, 3])]


def test_debounce(example: Any, unique: UniqueLocks, published: list[str]) -> None:
    mod = example("debounce")
    first = mod.autosave.delay(7, "Hel")
    second = mod.autosave.delay(7, "Hello")  # the burst goes on: it replaces the first
    assert published == [mod.autosave.name] * 2
    [lock] = unique.locks()
    assert lock.holders == (second.id,) != (first.id,)
    assert 0 < (lock.ttl or 0) - 3600 <= 2  # the countdown is added to its lease


def test_lock_check(example: Any, unique: UniqueLocks, published: list[str]) -> None:
    from celery_unique.store import store_of

    mod = example("lock_check")
    store = store_of(mod.app)
    assert store.acquire_lock("celery_unique:l:{feed_u}", token="running", limit=1,
                              lease_ms=60_000, mode="skip", wait_ms=0).fence
    assert mod.refresh_feed.delay("u").id == "running"  # not queued: the running import's
    assert published == []
    unique.release_all()
    mod.refresh_feed.delay("u")
    assert published == [mod.refresh_feed.name]


def test_rate_limit(example: Any, unique: UniqueLocks, published: list[str]) -> None:
    from celery_unique.store import store_of

    mod = example("rate_limit")
    queued = mod.sync_orders.delay("acme", "2026-12-01")
    assert published == [mod.sync_orders.name]
    # Its place in the account's line is taken at enqueue: the excess runs in order.
    line = "celery_unique:r:{partner_acme}:line"
    assert store_of(mod.app).client.zscore(line, queued.id) is not None
    unique.release_all()
    unique.eager()
    for n in range(3):  # under the limit: each starts at once
        mod.sync_orders.delay("acme", f"day {n}")
    assert services.done == [("orders synced", ["acme", f"day {n}"]) for n in range(3)]
