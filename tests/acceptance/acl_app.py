"""An app whose broker and lock store share one Redis database, each with a user of its
own (Redis ACL): the broker's user reaches only kombu's keys, the store's only its prefix.

Set by the test: ``CELERY_UNIQUE_ACL_BROKER``/``_STORE`` (the two URLs), ``_QUEUE`` and
``_OUT`` (a file the jobs append their letter to).
"""

from __future__ import annotations

import os
import time

from celery import Celery

from celery_unique import UniqueTask

app = Celery("acl", broker=os.environ["CELERY_UNIQUE_ACL_BROKER"])
app.conf.update(
    unique_redis_url=os.environ["CELERY_UNIQUE_ACL_STORE"],
    unique_key_prefix="lk",
    task_default_queue=os.environ["CELERY_UNIQUE_ACL_QUEUE"],
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
)


@app.task(base=UniqueTask, queueing_lock="q_{n}", lock="letters", lock_timeout=3,
          name="acl.letter")
def letter(n: int, value: str) -> None:
    time.sleep(0.02)
    with open(os.environ["CELERY_UNIQUE_ACL_OUT"], "a") as f:
        f.write(value)
