"""A worker's app with metrics on, each process's readings written to a folder.

``unique_metrics`` is a callable: every process that records (the caller, the worker's
main process, each pool process) makes its own meter provider, with an SDK
``InMemoryMetricReader`` whose cumulative readings a thread writes to
``CELERY_UNIQUE_TEST_METRICS/<pid>.json`` every 50 ms, as an exporter would push them.
Its broker (``CELERY_UNIQUE_TEST_REDIS``, db 6) and its lock store
(``CELERY_UNIQUE_TEST_STORE_URL``, a server the test may kill) are its own.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import redis
from celery import Celery
from celery.utils.log import get_task_logger
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from celery_unique import UniqueTask

SERVER = os.environ["CELERY_UNIQUE_TEST_REDIS"]
FOLDER = Path(os.environ["CELERY_UNIQUE_TEST_METRICS"])
DUMP_INTERVAL = 0.05  # s: how often each process writes its readings
logger = get_task_logger(__name__)


def readings(reader: InMemoryMetricReader) -> list[dict[str, Any]]:
    """Every data point: name, attributes, and a sum's value or a histogram's count."""
    out: list[dict[str, Any]] = []
    data = reader.get_metrics_data()
    for resource in data.resource_metrics if data else ():
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    value = getattr(point, "value", None)
                    out.append({"name": metric.name, "attributes": dict(point.attributes or {}),
                                "value": getattr(point, "count", value),
                                "sum": getattr(point, "sum", value)})
    return out


def provider() -> MeterProvider:
    """This process's provider (``unique_metrics`` calls it once per process)."""
    reader = InMemoryMetricReader()
    path = FOLDER / f"{os.getpid()}.json"

    def export() -> None:  # a push exporter's loop, to a file
        while FOLDER.is_dir():  # gone: the test is over
            temporary = path.with_suffix(".tmp")
            temporary.write_text(json.dumps(readings(reader)))
            temporary.replace(path)
            time.sleep(DUMP_INTERVAL)

    made = MeterProvider(metric_readers=[reader])
    threading.Thread(target=export, name="metrics-export", daemon=True).start()
    return made


app = Celery("metered", broker=f"{SERVER}/6", backend=f"{SERVER}/7", set_as_current=False)
app.conf.update(
    unique_redis_url=os.environ.get("CELERY_UNIQUE_TEST_STORE_URL"),
    unique_metrics=provider,
    task_default_queue="metered",
    broker_connection_retry_on_startup=True,
    worker_prefetch_multiplier=1,
)


@app.task(base=UniqueTask, queueing_lock="u_{token}", name="metered.unique", shared=False)
def unique(token: str) -> str:
    return token


@app.task(base=UniqueTask, lock="line_{run}", lock_timeout=5, name="metered.ordered",
          shared=False)
def ordered(run: str, n: int) -> int:
    redis.Redis.from_url(f"{SERVER}/4").rpush(f"metered:{run}", n)
    time.sleep(0.02)  # a short job: the others wait in line meanwhile
    return n


# A long lease: the main process may take seconds to see its pool process gone (four,
# seen under load), and releases a lock the job still holds.
@app.task(base=UniqueTask, lock="kill_{run}", lock_timeout=60, name="metered.killed",
          shared=False)
def killed(run: str) -> None:
    # The pool process dies holding the lock, once its readings say it took it (an
    # exporter's last push before a crash).
    path = FOLDER / f"{os.getpid()}.json"
    deadline = time.monotonic() + 10
    logger.warning("killed: waiting for %s", path)
    while time.monotonic() < deadline:
        if path.exists() and '"kill_{run}"' in path.read_text():
            break
        time.sleep(DUMP_INTERVAL / 5)
    logger.warning("killed: found it: %s", path.exists())
    os.kill(os.getpid(), signal.SIGKILL)


@app.task(base=UniqueTask, lock="blip_{run}", name="metered.blip", shared=False)
def blip(run: str) -> str:
    return run
