"""What metrics cost: the same tasks with ``unique_metrics`` off and on, side by side.

One process, one private Redis (broker and lock store, the atomic path). Three apps: plain
Celery, celery-unique with metrics off, celery-unique with metrics on (an OpenTelemetry
SDK ``MeterProvider`` with an in-memory reader: the recording, not an exporter's I/O,
which runs on its own thread). Measured per call, in paired rounds whose order changes
every round:

- an enqueue (``apply_async``, a queueing lock and a place in line: taken, counted);
- a run (``apply()``: the job takes its lock, runs, releases it, in this process: the
  acquired, wait, held and released instruments).

Prints µs per call, the cost added by metrics (on - off, the median of per-round
differences) and what metrics off adds over a task without locks (none of it is theirs:
the point is that it is the same as before metrics existed).

    python bench/metrics.py [--rounds 51] [--batch 200]
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import time
import uuid
from collections.abc import Callable
from typing import Any

import redis
from celery import Celery
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from celery_unique import UniqueTask
from celery_unique.testing import RedisServer


def make_tasks(url: str) -> dict[str, Any]:
    tasks: dict[str, Any] = {}
    for name, metrics in (("off", False), ("on", MeterProvider(
            metric_readers=[InMemoryMetricReader()]))):
        app = Celery(f"bench-{name}", broker=f"{url}/0", set_as_current=False)
        app.conf.update(unique_redis_url=f"{url}/0", task_default_queue="bench",
                        unique_metrics=metrics)

        @app.task(name="job", base=UniqueTask, queueing_lock="q_{key}", lock="l_{key}",
                  shared=False)
        def job(key: str) -> None: ...

        app.finalize()
        tasks[name] = job
    plain_app = Celery("bench-plain", broker=f"{url}/0", set_as_current=False)
    plain_app.conf.task_default_queue = "bench"

    @plain_app.task(name="plain", shared=False)
    def plain(key: str) -> None: ...

    plain_app.finalize()
    tasks["plain"] = plain
    return tasks


def timed(call: Callable[[str], Any], keys: list[str]) -> float:
    """µs per call of ``call`` over ``keys`` (the collector off inside a batch)."""
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter()
        for k in keys:
            call(k)
        return (time.perf_counter() - start) / len(keys) * 1e6
    finally:
        gc.enable()


def run(task: Any) -> Callable[[str], Any]:
    return lambda key: task.apply((key,))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=51)
    parser.add_argument("--batch", type=int, default=200)
    opts = parser.parse_args()
    server = RedisServer().start()
    try:
        tasks = make_tasks(server.url)
        flush = redis.Redis.from_url(server.url)
        calls = {(kind, name): (task.delay if kind == "enqueue" else run(task))
                 for kind in ("enqueue", "run") for name, task in tasks.items()}
        for call in calls.values():  # warm up connections, scripts and instruments
            timed(call, [uuid.uuid4().hex for _ in range(50)])
        results: dict[tuple[str, str], list[float]] = {c: [] for c in calls}
        order = list(calls)
        for _ in range(opts.rounds):
            random.shuffle(order)
            for each in order:
                flush.flushall()
                results[each].append(timed(calls[each], [uuid.uuid4().hex
                                                         for _ in range(opts.batch)]))
        flush.flushall()
    finally:
        server.stop()

    print(f"µs per call, median of {opts.rounds} paired rounds of {opts.batch}"
          " (one local Redis: broker and lock store)")
    print(f"{'':<9}{'plain':>9}{'off':>9}{'on':>9}{'on - off':>11}{'off - plain':>13}")
    for kind in ("enqueue", "run"):
        plain, off, on = (results[kind, n] for n in ("plain", "off", "on"))
        added = statistics.median(b - a for a, b in zip(off, on))
        locks = statistics.median(b - a for a, b in zip(plain, off))
        print(f"{kind:<9}{statistics.median(plain):>9.1f}{statistics.median(off):>9.1f}"
              f"{statistics.median(on):>9.1f}{added:>11.1f}{locks:>13.1f}")


if __name__ == "__main__":
    main()
