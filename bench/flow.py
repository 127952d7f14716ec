"""Flow control, measured: the global rate limit's precision and cost across workers, and
what replace and debounce cost a caller.

Starts a private Redis (broker and lock store: the atomic path) and ``--workers`` worker
processes (``celery worker``, prefork ``-c CONCURRENCY`` each, 2 by default) consuming
one queue.

1. **Precision.** ``rate * seconds`` jobs published at once under
   ``global_rate_limit=f"{rate}/s"`` (one key); each job records its start. Printed: the
   fullest window of one second (never above the limit), and the rate achieved after the
   first burst (the limit's share). Then the same jobs under Celery's own
   ``rate_limit`` (per worker process), measured the same way.
2. **Cost per start.** Scripts run per job (``EVALSHA`` in ``INFO commandstats``), its
   enqueue and its run, rate-limited jobs whose limit is never reached against plain
   ones, nothing else running.
3. **Jobs without a limit are not slowed.** A plain job is sent every 50 ms to a queue
   of its own that the same workers consume; its start latency (start minus send), p50
   and p99, in rounds of ``--window`` seconds whose order rotates (each kind's samples
   pooled): alone; beside the same jobs without a limit, sent in waves of the rate each
   second, as a saturated limit starts them (what running them costs); beside a limited
   backlog published at once and flowing at the limit
   (what waiting adds), the stream begun once the backlog is published and its first
   burst started. Also during the precision runs, publish included.
4. **Replace and debounce per call**, in this process: µs and scripts per call
   against a plain ``apply_async``, in paired rounds whose order changes every round.

    python bench/flow.py [--seconds 60] [--rate 50] [--workers 4] [--concurrency 2]
                         [--rounds 21]
                         [--pairs 6] [--window 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import redis
from celery import Celery

from celery_unique import UniqueTask
from celery_unique.testing import RedisServer, wait_for

SERVER = os.environ.get("BENCH_REDIS", "redis://127.0.0.1:6379")

app = Celery("bench_flow", broker=f"{SERVER}/0", set_as_current=False)
app.conf.update(unique_redis_url=f"{SERVER}/0", task_default_queue="flow",
                task_ignore_result=True, worker_hijack_root_logger=False,
                broker_connection_retry_on_startup=True, worker_prefetch_multiplier=4)


def _record(run: str, n: int, sent: float = 0.0) -> None:
    redis.Redis.from_url(f"{SERVER}/3").rpush(run, json.dumps([n, time.time(), sent]))


@app.task(base=UniqueTask, name="flow.limited", rate_limit_key="bench")
def limited(run: str, n: int) -> None:
    _record(run, n)


@app.task(name="flow.celery_limited")
def celery_limited(run: str, n: int) -> None:
    _record(run, n)


@app.task(name="flow.plain")
def plain(run: str, n: int, sent: float = 0.0) -> None:
    _record(run, n, sent)


@app.task(base=UniqueTask, name="flow.replaced", queueing_lock="r_{key}",
          on_duplicate="replace")
def replaced(key: str) -> None: ...


@app.task(base=UniqueTask, name="flow.debounced", queueing_lock="d_{key}", debounce=60,
          debounce_max=120)
def debounced(key: str) -> None: ...


def rows(run: str) -> list[tuple[int, float, float]]:
    client = redis.Redis.from_url(f"{SERVER}/3")
    return [tuple(json.loads(r)) for r in client.lrange(run, 0, -1)]  # type: ignore[misc]


def fullest(times: list[float], period: float = 1.0) -> int:
    """The most starts a window of ``period`` holds (the fullest opens at a start)."""
    times = sorted(times)
    most, j = 0, 0
    for i, start in enumerate(times):
        while j < len(times) and times[j] < start + period:
            j += 1
        most = max(most, j - i)
    return most


def scripts_run(client: redis.Redis) -> int:
    """Scripts run so far (``EVALSHA``): celery-unique's round trips. (``commandstats``
    also counts what a script calls, so the plain commands cannot tell a client's round
    trip from a script's step.)"""
    return int(client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))


def stream_plain(run: str, stop: threading.Event) -> None:
    """A plain job every 50 ms on a queue of its own, consumed by the same workers, until
    ``stop``; each records its start and its send."""
    n = 0
    while not stop.is_set():
        plain.apply_async((run, n, time.time()), queue="flow-plain")
        n += 1
        stop.wait(0.05)


def percentile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))]


def stream_during(during: Any) -> tuple[list[float], Any]:
    """Start latencies (s) of a plain stream sent while ``during()`` runs, and what it
    returned."""
    run, stop = uuid.uuid4().hex, threading.Event()
    streamer = threading.Thread(target=stream_plain, args=(run, stop))
    streamer.start()
    try:
        returned = during()
    finally:
        stop.set()
        streamer.join()
    wait_for(lambda: len(rows(run)) >= 1, timeout=30, what="the plain stream")
    sent = len(rows(run))
    wait_for(lambda: len(rows(run)) >= sent, timeout=30, what="the plain stream's end")
    return sorted(start - at for _, start, at in rows(run)), returned


def publish_limited(run: str, jobs: int, rate: int) -> None:
    for n in range(jobs):
        limited.apply_async((run, n), global_rate_limit=f"{rate}/s")


def precision(name: str, jobs: int, rate: int, cap: float) -> dict[str, Any]:
    """Publish ``jobs`` jobs of ``name`` at once and wait for them (``cap`` seconds at
    most: then those started are measured), a plain stream sent meanwhile; the fullest
    second, the rate after the first burst, the stream's latency."""
    task, run = app.tasks[name], f"{name}-{uuid.uuid4().hex[:8]}"

    def publish_and_wait() -> None:
        if name == "flow.limited":
            publish_limited(run, jobs, rate)
        else:
            for n in range(jobs):
                task.apply_async((run, n))
        until = time.monotonic() + cap
        wait_for(lambda: len(rows(run)) >= jobs or time.monotonic() > until,
                 timeout=cap + 10, interval=0.2, what=f"{jobs} {name} jobs")

    latency, _ = stream_during(publish_and_wait)
    times = sorted(start for _, start, _ in rows(run))
    return {"fullest": fullest(times), "started": len(times),
            "achieved": (len(times) - rate) / (times[-1] - times[0]),
            "p50": percentile(latency, 0.5), "p99": percentile(latency, 0.99)}


def publish_paced(run: str, jobs: int, rate: int, first: int = 0) -> None:
    """The same jobs without a limit, sent in the shape a saturated limit starts them:
    ``rate`` at once each second (from the ``first``: the first wave was sent before)."""
    began = time.monotonic()
    for wave, start in enumerate(range(first, jobs, rate), start=1):
        time.sleep(max(0.0, began + wave - time.monotonic()))
        for n in range(start, min(start + rate, jobs)):
            limited.apply_async((run, n))


KINDS = ("alone", "paced", "limited")


def paired_latency(pairs: int, window: float, rate: int) -> dict[str, list[float]]:
    """The plain stream's latencies in ``pairs`` rounds of each kind, the order rotating:
    alone; beside the same jobs without a limit sent in waves of ``rate`` a second, as
    the limit starts them (what running them costs the others); beside a limited
    backlog flowing at ``rate`` (what waiting adds). The backlog, or the first wave, is
    published and started before the stream begins (the publisher is not the workers'
    cost); the stream then runs ``window`` seconds while the jobs flow."""
    pooled: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for r in range(pairs):
        for kind in KINDS[r % 3:] + KINDS[:r % 3]:
            run, jobs = uuid.uuid4().hex, int(rate * (window + 1))
            if kind == "limited":
                publish_limited(run, jobs, rate)
            elif kind == "paced":
                for n in range(rate):
                    limited.apply_async((run, n))
            if kind != "alone":
                wait_for(lambda run=run: len(rows(run)) >= rate, timeout=30, interval=0.01,
                         what=f"the {kind} jobs' first burst")

            def during(kind: str = kind, run: str = run, jobs: int = jobs) -> None:
                if kind == "alone":
                    time.sleep(window)
                    return
                if kind == "paced":
                    publish_paced(run, jobs, rate, first=rate)
                wait_for(lambda: len(rows(run)) >= jobs, timeout=window * 3 + 30,
                         interval=0.05, what=f"the {kind} jobs")

            latency, _ = stream_during(during)
            pooled[kind] += latency
    return {kind: sorted(values) for kind, values in pooled.items()}


def commands_per_job(name: str, jobs: int, client: redis.Redis, **options: Any) -> float:
    """Scripts run per job of ``name``, its enqueue and its run, with nothing else running
    (none waits: the limit, if any, is never reached)."""
    run = uuid.uuid4().hex
    time.sleep(1.5)  # quiet: the previous run's last periods and sweeps are over
    before = scripts_run(client)
    for n in range(jobs):
        app.tasks[name].apply_async((run, n), **options)
    wait_for(lambda: len(rows(run)) >= jobs, timeout=120, what=f"{jobs} {name} jobs")
    return (scripts_run(client) - before) / jobs


def per_call(rounds: int) -> dict[str, tuple[float, float]]:
    """µs and Redis commands per call, paired rounds (the order changes every round)."""
    client = redis.Redis.from_url(f"{SERVER}/0")
    idle = {"queue": "flow-idle"}  # a queue no worker consumes: only the caller counts
    calls = {"plain": lambda k: plain.apply_async(("x", 0), **idle),
             "replace": lambda k: replaced.apply_async((k,), **idle),
             "debounce": lambda k: debounced.apply_async((k,), **idle)}
    times: dict[str, list[float]] = {name: [] for name in calls}
    commands: dict[str, list[float]] = {name: [] for name in calls}
    keys = [uuid.uuid4().hex for _ in range(4)]  # each call replaces the one before it
    names = list(calls)
    for r in range(rounds):
        for name in names[r % 3:] + names[:r % 3]:
            before, start = scripts_run(client), time.perf_counter()
            for i in range(200):
                calls[name](keys[i % 4])
            times[name].append((time.perf_counter() - start) / 200 * 1e6)
            commands[name].append((scripts_run(client) - before) / 200)
    return {name: (statistics.median(times[name]), statistics.median(commands[name]))
            for name in calls}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--rate", type=int, default=50)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--pairs", type=int, default=6, help="rounds of each kind")
    parser.add_argument("--window", type=float, default=5.0)
    opts = parser.parse_args()
    jobs = opts.rate * (opts.seconds + 1)

    server = RedisServer().start()
    os.environ["BENCH_REDIS"] = server.url
    global SERVER
    SERVER = server.url
    app.conf.update(broker_url=f"{server.url}/0", unique_redis_url=f"{server.url}/0")
    app.tasks["flow.celery_limited"].rate_limit = f"{opts.rate}/s"
    folder = Path(tempfile.mkdtemp(prefix="celery-unique-flow-"))
    env = {**os.environ, "PYTHONPATH": f"{Path(__file__).parent}{os.pathsep}"
           f"{os.environ.get('PYTHONPATH', '')}"}
    workers = [subprocess.Popen(
        [sys.executable, "-c", f"import flow; flow.celery_limited.rate_limit = "
         f"'{opts.rate}/s'; flow.app.worker_main(['worker', '-P', 'prefork',"
         f" '-c', '{opts.concurrency}', '-Q', 'flow,flow-plain', '-l', 'WARNING',"
         f" '--without-gossip', '--without-mingle', '--without-heartbeat', '-n',"
         f" 'flow{n}@bench', '--logfile={folder}/w{n}.log'])"],
        cwd=Path(__file__).parent, env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT) for n in range(opts.workers)]
    client = redis.Redis.from_url(f"{server.url}/0")
    try:
        for task in ("flow.plain", "flow.limited"):  # every pool process warmed up
            run = uuid.uuid4().hex
            for n in range(8 * opts.workers):
                app.tasks[task].apply_async((run, n), global_rate_limit="100000/s") if (
                    task == "flow.limited") else app.tasks[task].apply_async((run, n))
            wait_for(lambda run=run: len(rows(run)) >= 8 * opts.workers, timeout=120,
                     what="the workers to be ready")
        ours = precision("flow.limited", jobs, opts.rate, jobs / opts.rate * 3 + 60)
        paired = paired_latency(opts.pairs, opts.window, opts.rate)
        cost = {name: statistics.median(commands_per_job(name, 500, client, **options)
                                        for _ in range(3))
                for name, options in (("flow.plain", {}), ("flow.limited", {
                    "global_rate_limit": "100000/s"}))}
        calls = per_call(opts.rounds)
        # Last: Celery's own stalls the workers behind the jobs it holds (celery#10291),
        # whatever comes after; a minute of it is measured.
        celerys = precision("flow.celery_limited", jobs, opts.rate, 60)
    finally:
        for worker in workers:
            worker.terminate()
        for worker in workers:
            try:
                worker.wait(10)
            except subprocess.TimeoutExpired:  # jobs held by Celery's own rate limit
                worker.kill()
                worker.wait(10)
        server.stop()

    print(f"{jobs} jobs at {opts.rate}/s published at once, {opts.workers} worker processes"
          f" (prefork -c {opts.concurrency}):")
    for name, row in (("global_rate_limit", ours), ("Celery's rate_limit", celerys)):
        print(f"  {name:<20} fullest second {row['fullest']:>4} (limit {opts.rate});"
              f" achieved {row['achieved']:7.2f}/s after the first burst"
              f" ({row['achieved'] / opts.rate:.3f} of the limit); {row['started']} started")
    print(f"scripts (EVALSHA) per job, enqueue and run (median of 3 runs of 500, nothing"
          f" waiting): plain {cost['flow.plain']:.2f}, rate-limited"
          f" {cost['flow.limited']:.2f}: the enqueue's push, in place of kombu's LPUSH,"
          f" and one round trip at the start")
    alone, paced, beside = paired["alone"], paired["paced"], paired["limited"]

    def p(values: list[float]) -> str:
        return f"{percentile(values, 0.5) * 1e3:.1f} / {percentile(values, 0.99) * 1e3:.1f}"

    print(f"plain jobs every 50 ms on their own queue, same workers, start latency p50 / p99"
          f" (ms), {opts.pairs} rounds of {opts.window:g} s per kind, rotating"
          f" ({len(alone)}, {len(paced)}, {len(beside)} jobs): alone {p(alone)}; beside the"
          f" same jobs without a limit, {opts.rate} at once each second {p(paced)}; beside a"
          f" limited backlog flowing at {opts.rate}/s {p(beside)} (p99"
          f" {percentile(beside, 0.99) / percentile(paced, 0.99):.2f}x the unlimited jobs',"
          f" {percentile(beside, 0.99) / percentile(alone, 0.99):.2f}x alone)")
    print(f"  during the precision runs: beside global_rate_limit {ours['p50'] * 1e3:.1f} /"
          f" {ours['p99'] * 1e3:.1f}; beside Celery's rate_limit {celerys['p50'] * 1e3:.1f}"
          f" / {celerys['p99'] * 1e3:.1f}")
    print(f"per call, median of {opts.rounds} paired rounds of 200 (this process):")
    for name, (micros, sent) in calls.items():
        print(f"  {name:<9} {micros:7.0f} µs  {sent:.2f} scripts"
              f"  ({micros / calls['plain'][0]:.2f}x plain)")


if __name__ == "__main__":
    main()
