"""A worker's app whose tasks use no lock (the unique task may be given one per call).

Its broker (``CELERY_UNIQUE_QUIET_BROKER``: Redis or RabbitMQ), its lock store
(``CELERY_UNIQUE_QUIET_STORE``) and the Redis its jobs report to
(``CELERY_UNIQUE_QUIET_DONE``) are apart, so the tests can count connections to the
store alone.
"""

from __future__ import annotations

import os

from celery import Celery

from celery_unique import UniqueTask

app = Celery("quiet", broker=os.environ.get("CELERY_UNIQUE_QUIET_BROKER"))
app.conf.update(
    unique_redis_url=os.environ.get("CELERY_UNIQUE_QUIET_STORE"),
    task_default_queue=os.environ.get("CELERY_UNIQUE_QUIET_QUEUE", "quiet"),
    broker_connection_retry_on_startup=True,
    task_ignore_result=True,
)
DONE = os.environ.get("CELERY_UNIQUE_QUIET_DONE", "")


@app.task(name="quiet.plain", shared=False)
def plain(key: str) -> None:
    _done(key)


@app.task(base=UniqueTask, name="quiet.unique", shared=False)
def unique(key: str) -> None:
    _done(key)


def _done(key: str) -> None:
    import redis

    redis.Redis.from_url(DONE).rpush("quiet:done", key)
