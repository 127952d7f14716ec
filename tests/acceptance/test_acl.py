"""Least-privilege Redis users: the broker and the lock store in one database, each with
its own ACL user. Every script that touches both kinds of keys must run only where one
user reaches both; here each side keeps to its own keys, with its own connection."""

from __future__ import annotations

import logging
import os
import string
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from celery_unique import AlreadyQueued
from celery_unique.testing import RedisServer, wait_for

from .conftest import ROOT, Worker

pytestmark = pytest.mark.acceptance


@pytest.fixture(scope="module")
def acl(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A private server with two users on database 3, and the app's environment."""
    with RedisServer() as server:
        admin = redis.Redis.from_url(server.url)
        queue = f"acl-{uuid.uuid4().hex[:8]}"
        # kombu's keys (its queue, bindings, unacked messages) and its pub/sub channels.
        admin.acl_setuser("broker", enabled=True, passwords=["+bpass"], commands=["+@all"],
                          keys=[f"{queue}*", "_kombu*", "unacked*", "celery*", "*pidbox*"],
                          channels=["*"])
        admin.acl_setuser("locks", enabled=True, passwords=["+lpass"], commands=["+@all"],
                          keys=["lk:*"])
        host = server.url.removeprefix("redis://")
        env = {"CELERY_UNIQUE_ACL_BROKER": f"redis://broker:bpass@{host}/3",
               "CELERY_UNIQUE_ACL_STORE": f"redis://locks:lpass@{host}/3",
               "CELERY_UNIQUE_ACL_QUEUE": queue,
               "CELERY_UNIQUE_ACL_OUT": str(tmp_path_factory.mktemp("acl") / "letters"),
               "CELERY_UNIQUE_TEST_REDIS": server.url}
        os.environ.update(env)
        yield {**env, "url": server.url}


def test_two_users_enqueue_refuse_run_in_order_and_list(
    acl: dict[str, str], caplog: pytest.LogCaptureFixture,
) -> None:
    from tests.acceptance import acl_app

    letters = string.ascii_lowercase[:10]
    with caplog.at_level(logging.INFO, logger="celery_unique"):
        for n, value in enumerate(letters):
            acl_app.letter.delay(n, value)
    assert caplog.text.count("reached as another user") == 1  # said once
    with pytest.raises(AlreadyQueued):
        acl_app.letter.delay(0, "a")  # queued, no worker yet: refused

    server = RedisServer.__new__(RedisServer)  # only for Worker's URL
    server.url = acl["url"]
    worker = Worker(server, concurrency=4, name="acl", queues=acl["CELERY_UNIQUE_ACL_QUEUE"],
                    app="tests.acceptance.acl_app", env=acl)
    out = Path(acl["CELERY_UNIQUE_ACL_OUT"])
    try:
        worker.wait_ready()
        # Four processes, one lock, in creation order: parked jobs woken and published
        # again, each side with its own user.
        wait_for(lambda: out.exists() and len(out.read_text()) == len(letters),
                 timeout=60, what="the ten letters")
        assert out.read_text() == letters
        logs = worker.logs()
        assert "NOPERM" not in logs and "no permissions" not in logs, logs
    finally:
        worker.stop()
    listed = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tests.acceptance.acl_app", "unique", "locks",
         "--json"], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.startswith("[")
    assert not _keys_outside(acl["url"])


def _keys_outside(url: str) -> list[Any]:
    """Keys of database 3 that neither user may reach: none should have been written."""
    keys = redis.Redis.from_url(f"{url}/3").keys()
    allowed = ("acl-", "_kombu", "unacked", "celery", "lk:")  # and pidbox queues
    return [k for k in keys if not k.decode().startswith(allowed)]
