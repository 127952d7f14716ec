"""The demo's Celery app: what ``python -m celery_unique demo`` runs in its worker.

The demo sets ``CELERY_UNIQUE_DEMO_URL`` (the Redis database it uses for the broker and
the locks) and ``CELERY_UNIQUE_DEMO_RUN`` (this run's id: its queue and every key it
writes carry it, so that a Redis of the user's is left as it was).
"""

from __future__ import annotations

import json
import os
import random
import signal
import time

import redis
from celery import Celery

from .task import UniqueTask

URL = os.environ.get("CELERY_UNIQUE_DEMO_URL", "redis://127.0.0.1:6379/0")
RUN = os.environ.get("CELERY_UNIQUE_DEMO_RUN", "demo")
#: This run's queue, and the prefix of the keys its jobs write (not its locks').
QUEUE = f"celery-unique-demo-{RUN}"
KEYS = f"celery-unique-demo:{RUN}"

app = Celery("celery_unique_demo", broker=URL)
app.conf.update(
    unique_redis_url=URL, task_default_queue=QUEUE, task_ignore_result=True,
    worker_hijack_root_logger=False, broker_connection_retry_on_startup=True,
    worker_prefetch_multiplier=1, worker_enable_remote_control=False,
)
store = redis.Redis.from_url(URL)


def key(name: str) -> str:
    return f"{KEYS}:{name}"


@app.task(  # type: ignore[untyped-decorator]
    base=UniqueTask, queueing_lock="report_<email>_" + RUN, queueing_lock_until="finished",
    name="demo.send_pdf_report",
)
def send_pdf_report(email: str) -> None:
    """A report that runs until the demo's burst of duplicates is over."""
    deadline = time.monotonic() + 20
    while not store.exists(key("burst-over")) and time.monotonic() < deadline:
        time.sleep(0.01)
    store.rpush(key("reports"), email)


def _write(path: str, letter: str) -> None:
    time.sleep(random.random() * 0.05)  # jobs of uneven length: they finish out of order
    with open(path, "a") as f:
        f.write(letter)


@app.task(name="demo.write_letter")  # type: ignore[untyped-decorator]
def write_letter(path: str, letter: str) -> None:
    """Without a lock: four processes write at once, in whatever order they finish."""
    _write(path, letter)


@app.task(  # type: ignore[untyped-decorator]
    base=UniqueTask, lock="{path}", name="demo.write_letter_locked")
def write_letter_locked(path: str, letter: str) -> None:
    """The seed's alphabet: one job at a time per file, in creation order."""
    _write(path, letter)


@app.task(  # type: ignore[untyped-decorator]
    base=UniqueTask, lock="{resource}", lock_limit=2, lock_timeout=2, bind=True,
    name="demo.limited")
def limited(self: UniqueTask, resource: str, n: int, crash: bool = False) -> None:
    """At most two jobs per resource at once; ``crash``: SIGKILL its own process."""
    start = time.time()
    if crash:
        store.set(key("crashed"), json.dumps([self.request.id, resource, start]))
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.01 + random.random() * 0.03)
    store.rpush(key(f"spans:{resource}"), json.dumps([start, time.time(), n]))
