"""Enqueue cost: plain Celery, celery-once, celery-singleton and celery-unique, side by side.

One process, one run, one Redis server (a private one started here, or --redis-url) as
broker and lock store. celery-unique runs twice: with its locks in the broker's database
(the default; the atomic path, the locks taken by the script that pushes the message)
and in another database (the separate path). Prints µs per ``apply_async`` with unique
arguments (every enqueue accepted) and with one argument (every enqueue a duplicate),
each library's added cost over plain Celery, and the ratios to celery-once as medians of
per-round ratios: each round runs one batch per library, in a fresh order every round, so
the machine's drift hits all alike.

    python bench/enqueue.py [--rounds 101] [--batch 100] [--redis-url URL]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import random
import statistics
import time
import uuid
from collections.abc import Callable
from typing import Any

import redis
from celery import Celery

from celery_unique import AlreadyQueued, UniqueTask, broker
from celery_unique.store import get_store
from celery_unique.testing import RedisServer


def make_apps(url: str) -> dict[str, Any]:
    from celery_once import AlreadyQueued as OnceQueued
    from celery_once import QueueOnce
    from celery_singleton import Singleton

    app = Celery("bench", broker=f"{url}/0", set_as_current=False)
    app.conf.update(
        unique_redis_url=f"{url}/0",
        ONCE={"backend": "celery_once.backends.Redis",
              "settings": {"url": f"{url}/2", "default_timeout": 3600}},
        singleton_backend_url=f"{url}/3",
        task_default_queue="bench",
    )

    @app.task(name="plain", shared=False)
    def plain(key: str) -> None: ...

    @app.task(name="once", base=QueueOnce, shared=False, once={"keys": ["key"]})
    def once(key: str) -> None: ...

    @app.task(name="singleton", base=Singleton, shared=False)
    def singleton(key: str) -> None: ...

    @app.task(name="unique", base=UniqueTask, queueing_lock="{key}", shared=False)
    def unique(key: str) -> None: ...

    # The same task on an app whose locks live in another database: the separate path.
    other = Celery("bench-separate", broker=f"{url}/0", set_as_current=False)
    other.conf.update(unique_redis_url=f"{url}/1", task_default_queue="bench")

    @other.task(name="unique", base=UniqueTask, queueing_lock="{key}", shared=False)
    def separate(key: str) -> None: ...

    # The separate path as it was before its short lease: the full lease from the start
    # (a publish lease as long as it), so no second command once published.
    full = Celery("bench-separate-full", broker=f"{url}/0", set_as_current=False)
    full.conf.update(unique_redis_url=f"{url}/1", task_default_queue="bench",
                     unique_publish_lease=3600.0)

    @full.task(name="unique", base=UniqueTask, queueing_lock="{key}", shared=False)
    def separate_full(key: str) -> None: ...

    for each in (app, other, full):
        each.finalize()
    assert broker.atomic(app, get_store(app)) and not broker.atomic(other, get_store(other))
    return {"plain": (plain, ()), "celery-once": (once, (OnceQueued,)),
            "celery-singleton": (singleton, ()), "celery-unique": (unique, (AlreadyQueued,)),
            "unique-separate": (separate, (AlreadyQueued,)),
            "separate-no-short": (separate_full, (AlreadyQueued,))}


def timed(call: Callable[[str], Any], keys: list[str], errors: tuple[type, ...]) -> float:
    """µs per call of ``call`` over ``keys``."""
    # The collector runs between batches, not inside one: a collection would be charged
    # to whichever library's batch it interrupted.
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter()
        for k in keys:
            try:  # noqa: SIM105 - cheaper per call than contextlib.suppress
                call(k)
            except errors:
                pass
        return (time.perf_counter() - start) / len(keys) * 1e6
    finally:
        gc.enable()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=101)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--verbose", action="store_true", help="print every round")
    parser.add_argument("--redis-url", help="a Redis server to use (its dbs 0-3 are FLUSHED)")
    opts = parser.parse_args()

    server = None if opts.redis_url else RedisServer().start()
    url = opts.redis_url or server.url  # type: ignore[union-attr]
    try:
        tasks = make_apps(url)
        flush = redis.Redis.from_url(url)
        for task, errors in tasks.values():  # warm up connections and scripts
            timed(task.delay, [f"warm-{uuid.uuid4()}" for _ in range(50)], errors)
        results: dict[str, dict[str, list[float]]] = {n: {"unique": [], "dup": []}
                                                       for n in tasks}
        order = list(tasks.items())
        for _round in range(opts.rounds):
            # A fresh order each round: drift within a round favours no library.
            random.shuffle(order)
            for name, (task, errors) in order:
                flush.flushall()
                keys = [uuid.uuid4().hex for _ in range(opts.batch)]
                results[name]["unique"].append(timed(task.delay, keys, errors))
                with contextlib.suppress(*errors):
                    task.delay("same")  # the job that the duplicates meet
                results[name]["dup"].append(timed(task.delay, ["same"] * opts.batch, errors))
        flush.flushall()
    finally:
        if server:
            server.stop()

    med = {n: {k: statistics.median(v) for k, v in r.items()} for n, r in results.items()}
    base = med["plain"]
    if opts.verbose:
        for name, r in results.items():
            print(name, " ".join(f"{x:.0f}" for x in r["unique"]))
    print(f"µs per apply_async, median of {opts.rounds} rounds of {opts.batch}"
          " (Redis broker and lock store on one local server)")
    print(f"{'library':<18}{'unique args':>13}{'added':>9}{'duplicates':>13}{'added':>9}")
    for name, m in med.items():
        print(f"{name:<18}{m['unique']:>13.1f}{m['unique'] - base['unique']:>9.1f}"
              f"{m['dup']:>13.1f}{m['dup'] - base['unique']:>9.1f}")

    def paired(name: str, kind: str) -> float:
        """The median over rounds of this round's ratio to celery-once's."""
        plain, once, ours = (results[n][kind] for n in ("plain", "celery-once", name))
        if kind == "dup":
            return statistics.median(o / c for o, c in zip(ours, once))
        return statistics.median((o - p) / (c - p) for o, c, p in zip(ours, once, plain))

    for name, label in (("celery-unique", "atomic path"), ("unique-separate", "separate path"),
                        ("separate-no-short", "separate path, no short lease")):
        print(f"{label}: added cost / celery-once's (paired per round):"
              f" {paired(name, 'unique'):.2f}"
              f"{' (bar <= 0.15)' if name == 'celery-unique' else ''};"
              f" duplicate / celery-once's: {paired(name, 'dup'):.2f} (bar <= 0.5)")

if __name__ == "__main__":
    main()
