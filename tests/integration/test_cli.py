"""``celery -A proj unique ...`` and the admin API under it, against a real Redis."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from click.testing import CliRunner

from celery_unique import admin
from celery_unique.cli import DUPLICATE
from celery_unique.store import get_store
from celery_unique.testing import RedisServer, wait_for
from celery_unique.wire import ParkedMessage

ROOT = Path(__file__).resolve().parents[2]
APP = "tests.integration.cli_app"


@pytest.fixture
def cli(unique_redis_server: RedisServer) -> Iterator[Any]:
    """The CLI app on db 6 of the private server, and a way to run ``celery`` there."""
    from celery.bin.celery import celery

    url = f"{unique_redis_server.url}/6"
    redis.Redis.from_url(url).flushdb()
    os.environ["CELERY_UNIQUE_CLI_REDIS"] = url
    from tests.integration import cli_app

    cli_app.app.conf.update(broker_url=url, unique_redis_url=url)
    get_store(cli_app.app)  # its tasks use the store its settings name now
    try:
        runner = CliRunner(mix_stderr=False)  # type: ignore[call-arg]
    except TypeError:  # click >= 8.2: stderr is always apart
        runner = CliRunner()

    def run(*args: str, stdin: str | None = None) -> Any:
        return runner.invoke(celery, ["-A", APP, "unique", *args], input=stdin)

    run.app, run.module, run.client = cli_app.app, cli_app, redis.Redis.from_url(url)
    yield run
    redis.Redis.from_url(url).flushdb()


def test_locks_lists_both_kinds_as_a_table_and_as_json(cli: Any) -> None:
    held = cli.module.report.delay("alice@example.com")
    store = cli.app.conf.unique_redis_url and cli.module.locked._unique_store()
    assert store.acquire_lock("celery_unique:l:{res_1}", token="job-a", limit=1,
                              lease_ms=60000, mode="order", wait_ms=60000).grant == 1
    for token in ("job-b", "job-c"):
        store.enter_line("celery_unique:l:{res_1}", token, 60000)
    table = cli("locks")
    assert table.exit_code == 0, table.output
    assert table.output.splitlines()[0].split() == [
        "KIND", "TASK", "VALUE", "HOLDERS", "STATUS", "STATE", "TTL", "FENCE", "WAITING"]
    assert table.output.splitlines()[-1] == "2 locks (1 queueing, 1 locks)"
    listed = json.loads(cli("locks", "--json").stdout)
    by_kind = {lock["kind"]: lock for lock in listed}
    assert by_kind["queueing"] | {"ttl": None} == {
        "key": "celery_unique:q:{cli.report:report_alice@example.com}", "kind": "queueing",
        "task": "cli.report", "value": "report_alice@example.com", "holders": [held.id],
        "ttl": None, "fence": None, "waiting": 0, "status": ["unknown"], "lease_left": None}
    assert 3590 < by_kind["queueing"]["ttl"] <= 3600
    assert (by_kind["lock"]["key"], by_kind["lock"]["task"], by_kind["lock"]["value"],
            by_kind["lock"]["holders"], by_kind["lock"]["waiting"]) == (
        "celery_unique:l:{res_1}", None, "res_1", ["job-a"], 2)
    assert by_kind["lock"]["status"] == ["alive"]
    assert 55 < by_kind["lock"]["lease_left"][0] <= 60
    def keys(*args: str) -> list[str]:
        return [lock["key"] for lock in json.loads(cli("locks", "--json", *args).stdout)]

    assert keys("--kind", "lock") == keys("--match", "res_*") == [by_kind["lock"]["key"]]
    assert keys("--task", "cli.report") == [by_kind["queueing"]["key"]]
    shown = cli("show", "res_1")
    assert shown.exit_code == 0
    assert [line.split()[:2] for line in shown.output.splitlines()[-2:]] == [
        ["0", "job-b"], ["1", "job-c"]]


def test_rate_limits_are_listed_with_their_starts_and_waiting_jobs(cli: Any) -> None:
    """A ``global_rate_limit`` is listed as kind ``rate``: its holders are the starts of
    its period, its line the jobs waiting for one; ``release`` frees its starts, handing
    them to the jobs in line."""
    store = cli.module.limited._unique_store()
    base = "celery_unique:r:{api_acme}"
    queued = [cli.module.limited.delay("acme") for _ in range(3)]  # their places in line
    for job in queued[:2]:  # two start: the period's limit
        assert store.acquire_lock(base, token=job.id, limit=2, lease_ms=60_005,
                                  mode="order", wait_ms=3_600_000).grant == 1
    listed = json.loads(cli("locks", "--json", "--kind", "rate").stdout)
    assert [(r["kind"], r["value"], sorted(r["holders"]), r["waiting"]) for r in listed] == [
        ("rate", "api_acme", sorted(j.id for j in queued[:2]), 1)]
    assert cli("locks").output.splitlines()[-1] == "1 locks (0 queueing, 0 locks, 1 rate limits)"
    shown = cli("show", base)
    assert shown.exit_code == 0 and queued[2].id in shown.output
    assert admin.release(cli.app, base) == 2
    assert [(r["holders"], r["waiting"]) for r in json.loads(cli("locks", "--json").stdout)
            ] == [([], 1)]  # the third still on its way to a worker, first in line


def test_a_dead_holder_is_told_from_a_live_one_and_released_alone(cli: Any) -> None:
    """A holder whose lease ran out (its worker SIGKILLed: nothing renews it) is listed as
    ``lease expired``, how long ago; ``--dry-run`` releases nothing; ``--dead`` releases
    it, and leaves a live holder and a queueing lock alone."""
    store = cli.module.locked._unique_store()
    store.acquire_lock("celery_unique:l:{dead}", token="job-dead", limit=1, lease_ms=300,
                       mode="order", wait_ms=60000)
    store.acquire_lock("celery_unique:l:{live}", token="job-live", limit=1, lease_ms=60000,
                       mode="order", wait_ms=60000)
    cli.module.report.delay("q@example.com")

    def listed() -> dict[str, Any]:
        return {lock["value"]: lock for lock in json.loads(cli("locks", "--json").stdout)}

    wait_for(lambda: listed()["dead"]["status"] == ["lease expired"], timeout=5,
             what="the lease to run out")
    locks = listed()
    assert locks["dead"]["lease_left"][0] < 0 and locks["live"]["status"] == ["alive"]
    assert locks["report_q@example.com"]["status"] == ["unknown"]
    assert "expired" in cli("locks").output and "ago" in cli("show", "dead").output
    dry = cli("clear", "--dead", "--dry-run")
    assert dry.exit_code == 0 and "celery_unique:l:{dead}" in dry.output
    assert "{live}" not in dry.output and "would release 1 lock" in dry.output
    assert set(listed()) == {"dead", "live", "report_q@example.com"}  # nothing released
    assert cli("release", "celery_unique:l:{live}", "--dead", "--yes").output.startswith(
        "nothing to release")
    done = cli("clear", "--dead", "--yes")
    assert done.exit_code == 0 and done.output.splitlines()[-1] == "released 1 lock(s)"
    assert set(listed()) == {"live", "report_q@example.com"}


def test_a_lock_not_yet_published_is_listed_as_publishing(cli: Any) -> None:
    store = cli.module.locked._unique_store()
    key = "celery_unique:q:{cli.report:report_p@example.com}"
    store.send_acquire_queueing_lock(key, "job-p", 10_000, publishing=True).result()

    def status() -> list[str]:
        [lock] = json.loads(cli("locks", "--json").stdout)
        return list(lock["status"])

    assert status() == ["publishing"]
    assert store.published("job-p", key, 60_000).queueing  # published: its full lease
    assert status() == ["unknown"] and not cli.client.exists(f"{key}:publishing")


def test_ten_thousand_locks_are_listed(cli: Any) -> None:
    pipe = cli.client.pipeline(transaction=False)
    for n in range(10_000):
        pipe.set(f"celery_unique:q:{{cli.report:report_{n}}}", f"id-{n}", px=600_000)
    pipe.execute()
    listed = json.loads(cli("locks", "--json", "--no-states").stdout)
    assert len(listed) == 10_000
    assert {lock["value"] for lock in listed} == {f"report_{n}" for n in range(10_000)}
    assert len(json.loads(cli("locks", "--json", "--limit", "7").stdout)) == 7


def test_release_lets_the_next_enqueue_in(cli: Any) -> None:
    cli.module.report.delay("bob@example.com")
    key = "celery_unique:q:{cli.report:report_bob@example.com}"
    refused = cli("release", key)  # no --yes and no terminal: nothing released
    assert refused.exit_code != 0 and cli.client.exists(key)
    done = cli("release", key, "--yes")
    assert done.exit_code == 0, done.output
    assert not cli.client.exists(key)
    assert cli.module.report.delay("bob@example.com").id


def test_release_hands_a_lock_to_the_first_in_line(cli: Any) -> None:
    """As a holder's own end would: the first parked job is handed the lock and its
    message published onto its queue."""
    base = "celery_unique:l:{res_2}"
    store = cli.module.locked._unique_store()
    queue = f"handed-{uuid.uuid4().hex}"
    assert store.acquire_lock(base, token="holder", limit=1, lease_ms=60000, mode="order",
                              wait_ms=60000).grant == 1
    store.acquire_lock(base, token="first", limit=1, lease_ms=60000, mode="order",
                       wait_ms=60000)
    message = json.dumps({"headers": {"task": "cli.locked", "id": "first"},
                          "properties": {"delivery_tag": "first.cu"}})
    store.park(base, token="first", limit=1, lease_ms=60000,
               message=ParkedMessage(queue, message).encode())
    done = cli("release", base, "--yes")
    assert done.exit_code == 0, done.output
    assert [h.decode() for h in cli.client.zrange(f"{base}:holders", 0, -1)] == ["first"]
    [pushed] = cli.client.lrange(queue, 0, -1)
    assert json.loads(pushed)["headers"]["id"] == "first"
    assert json.loads(pushed)["properties"]["delivery_tag"] != "first.cu"  # a fresh tag
    info = admin.get_lock(cli.app, base)
    assert info is not None and info.holders == ("first",) and info.line == ()


def test_clear_releases_what_the_filters_select(cli: Any) -> None:
    for email in ("a", "b", "c"):
        cli.module.report.delay(email)
    done = cli("clear", "--match", "report_[ab]", "--yes")
    assert done.exit_code == 0 and done.output.splitlines()[-1] == "released 2 lock(s)"
    assert [lock.value for lock in admin.iter_locks(cli.app)] == ["report_c"]


def test_defer_queues_refuses_or_ignores_a_duplicate(cli: Any) -> None:
    queue = cli.app.conf.task_default_queue
    first = cli("defer", "cli.report", "--kwargs", '{"email": "x@example.com"}')
    assert first.exit_code == 0, first.output
    task_id = first.stdout.strip()
    assert cli.client.get("celery_unique:q:{cli.report:report_x@example.com}") == (
        task_id.encode())
    length = cli.client.llen(queue)
    duplicate = cli("defer", "cli.report", "--args", '["x@example.com"]')
    assert duplicate.exit_code == DUPLICATE
    assert duplicate.stderr.count("\n") == 1 and task_id in duplicate.stderr
    ignored = cli("defer", "cli.report", "--args", '["x@example.com"]', "-i")
    # On stderr: a cron job running `defer -i` mails what it prints on stdout.
    assert ignored.exit_code == 0 and "ignored" in ignored.stderr and not ignored.stdout
    assert cli.client.llen(queue) == length  # nothing more published
    # procrastinate's example: a queueing lock given on the command line.
    maintenance = cli("defer", "cli.plain", "--queueing-lock", "maintenance")
    assert maintenance.exit_code == 1 and "not a UniqueTask" in maintenance.stderr
    locked = cli("defer", "cli.locked", "--args", "[3]", "--queueing-lock", "maintenance",
                 "--countdown", "5")
    assert locked.exit_code == 0, locked.output
    assert cli("defer", "cli.locked", "--args", "[4]", "--queueing-lock",
               "maintenance").exit_code == DUPLICATE


@pytest.mark.parametrize("args, says", [
    (["defer", "cli.nope"], "no task 'cli.nope'"),
    (["defer", "proj.zzzzzz"], "no task 'proj.zzzzzz' is registered"),
    (["defer", "report"], "no task 'report'; did you mean 'cli.report'?"),
    (["defer", "cli.report", "--args", "{oops"], "--args is not JSON"),
    (["defer", "cli.report", "--args", '{"a": 1}'], "--args must be a JSON array"),
    (["show", "celery_unique:q:{cli.report:nobody}"], "no lock"),
    (["release", "celery_unique:l:{nothing}", "--yes"], "no lock"),
    (["release", "not-a-key", "--yes"], "no lock"),
    (["locks", "--kind", "lock", "--json"], None),  # no error: an empty array
])
def test_every_error_is_one_line_and_a_non_zero_exit(
    cli: Any, args: list[str], says: str | None
) -> None:
    result = cli(*args)
    if says is None:
        assert result.exit_code == 0 and json.loads(result.stdout) == []
        return
    assert result.exit_code == 1, result.output
    assert result.stderr.count("\n") == 1 and says in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_a_no_at_the_prompt_releases_nothing_and_says_so(cli: Any, monkeypatch: Any) -> None:
    cli.module.report.delay("p@example.com")
    monkeypatch.setattr("celery_unique.cli._interactive", lambda: True)  # as at a terminal
    done = cli("clear", stdin="n\n")
    assert done.exit_code == 1 and done.stderr == "celery unique: nothing released\n"
    assert len(list(admin.iter_locks(cli.app))) == 1


def test_an_unqualified_task_name_is_hinted(cli: Any) -> None:
    """``--task`` takes the registered name: a short one lists nothing, and says which."""
    cli.module.report.delay("q@example.com")
    for args in (["locks"], ["locks", "--json"]):
        done = cli(*args, "--task", "report")
        assert done.exit_code == 0
        assert "no task 'report'; did you mean 'cli.report'?" in done.stderr


def test_usage_errors_exit_2(cli: Any) -> None:
    done = cli("locks", "--kind", "nope")
    assert done.exit_code == 2 and "Invalid value" in done.stderr


def test_no_app_and_an_unreachable_store_are_one_line_too(
    unique_redis_server: RedisServer,
) -> None:
    """In a process of its own, as an operator runs it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT),
           "CELERY_UNIQUE_CLI_REDIS": "redis://:secret@127.0.0.1:1/0"}
    for args, says in ((["unique", "locks"], "no app"),
                       (["-A", APP, "unique", "locks"],
                        "cannot reach the lock store at redis://:***@127.0.0.1:1/0"),
                       (["-A", APP, "unique", "locks", "--json"],
                        "cannot reach the lock store at redis://:***@127.0.0.1:1/0"),
                       (["-A", APP, "unique", "defer", "cli.report", "--args", '["z"]'],
                        "cannot reach the broker at redis://:***@127.0.0.1:1/0")):
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "celery", *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=60)
        took = time.monotonic() - started
        assert done.returncode == 1, (args, done.stdout, done.stderr)
        assert done.stderr.count("\n") == 1 and says in done.stderr, (args, done.stderr)
        assert "secret" not in done.stderr
        assert done.stdout == ""  # no half-written JSON for a pipe
        assert took < 10, (args, took)  # the interpreter's start included; ~1.5 s alone
