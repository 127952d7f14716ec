"""A Celery app on RabbitMQ, a broker other than Redis; its locks go to the private Redis.

Its queue is the test's own and deleted with its last consumer, so the tests leave
nothing behind on a RabbitMQ they share.
"""

from __future__ import annotations

import os
import random
import time

from celery import Celery
from kombu import Queue

from celery_unique import UniqueTask

# The tests' private server, never a Redis the machine runs: set by the tests' fixtures.
SERVER = os.environ["CELERY_UNIQUE_TEST_REDIS"]
BROKER = os.environ.get("CELERY_UNIQUE_TEST_AMQP", "amqp://guest:guest@localhost:5672//")
QUEUE = os.environ.get("CELERY_UNIQUE_TEST_AMQP_QUEUE", "celery-unique-test")

app = Celery("amqp_acceptance", broker=BROKER)
app.conf.update(
    # Unset by a test: a non-Redis broker with no lock store named.
    unique_redis_url=None if os.environ.get("CELERY_UNIQUE_TEST_NO_STORE") else f"{SERVER}/1",
    task_default_queue=QUEUE,
    task_queues=[Queue(QUEUE, auto_delete=True)],
    task_publish_retry=False,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
)


@app.task(base=UniqueTask, queueing_lock="amqp_{path}_{letter}", lock="{path}",
          lock_timeout=3, name="amqp.write_letter", shared=False)
def write_letter(path: str, letter: str) -> None:
    time.sleep(random.random() * 0.05)
    with open(path, "a") as f:
        f.write(letter)
