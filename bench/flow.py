"""Flow control, measured: the global rate limit's precision and cost across workers, and
what replace and debounce cost a caller.

Starts a private Redis (broker and lock store: the atomic path) and ``--workers`` worker
processes (``celery worker``, prefork ``-c 2`` each) consuming one queue.

1. **Precision.** ``rate * seconds`` jobs published at once under
   ``global_rate_limit=f"{rate}/s"`` (one key); each job records its start. Printed: the
   fullest window of one second (never above the limit), and the rate achieved after the
   first burst (the limit's share). Then the same jobs under Celery's own
   ``rate_limit`` (per worker process), measured the same way.
2. **Cost per start.** Scripts run per job (``EVALSHA`` in ``INFO commandstats``), its
   enqueue and its run, rate-limited jobs whose limit is never reached against plain
   ones, nothing else running.
3. **Jobs without a limit are not slowed.** While the limited backlog waits, a plain
   job is sent every 50 ms to a queue of its own that the same workers consume; their
   start latency (start minus send), p50 and p99, against the same stream alone.
4. **Replace and debounce per call**, in this process: µs and scripts per call
   against a plain ``apply_async``, in paired rounds whose order changes every round.

    python bench/flow.py [--seconds 60] [--rate 50] [--workers 4] [--rounds 21]
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


def streamed(during: Any) -> dict[str, float]:
    """Start latency p50/p99 (s) of a plain stream sent while ``during()`` runs; p99 also
    of those sent after ``during()`` returned a time (the backlog's intake over)."""
    run, stop = uuid.uuid4().hex, threading.Event()
    streamer = threading.Thread(target=stream_plain, args=(run, stop))
    streamer.start()
    try:
        settled_at = during()
    finally:
        stop.set()
        streamer.join()
    wait_for(lambda: len(rows(run)) >= 1, timeout=30, what="the plain stream")
    sent = len(rows(run))
    wait_for(lambda: len(rows(run)) >= sent, timeout=30, what="the plain stream's end")
    got = rows(run)
    lat = sorted(start - at for _, start, at in got)
    # Once the backlog has been taken in (every job received, asked, parked), what the
    # waiting jobs cost the others.
    settled = sorted(start - at for _, start, at in got if at > (settled_at or 0))
    return {"p50": percentile(lat, 0.5), "p99": percentile(lat, 0.99), "jobs": len(lat),
            "p99_settled": percentile(settled, 0.99) if settled else float("nan")}


def precision(name: str, jobs: int, rate: int, cap: float) -> dict[str, Any]:
    """Publish ``jobs`` jobs of ``name`` at once and wait for them (``cap`` seconds at
    most: then those started are measured), a plain stream sent meanwhile; the fullest
    second, the rate after the first burst, the stream's latency."""
    task, run = app.tasks[name], f"{name}-{uuid.uuid4().hex[:8]}"
    options = {"global_rate_limit": f"{rate}/s"} if name == "flow.limited" else {}

    def publish_and_wait() -> float:
        for n in range(jobs):
            task.apply_async((run, n), **options)
        until = time.monotonic() + cap
        parked = redis.Redis.from_url(f"{SERVER}/0")
        # Taken in: every job started or parked (Celery's own holds jobs in its workers).
        wait_for(lambda: len(rows(run)) + parked.hlen("celery_unique:r:{bench}:parked")
                 >= jobs or time.monotonic() > until, timeout=cap + 10, interval=0.05,
                 what=f"{jobs} {name} jobs to be taken in")
        taken_in = time.time()
        wait_for(lambda: len(rows(run)) >= jobs or time.monotonic() > until,
                 timeout=cap + 10, interval=0.2, what=f"{jobs} {name} jobs")
        return taken_in

    latency = streamed(publish_and_wait)  # type: ignore[arg-type]
    times = sorted(start for _, start, _ in rows(run))
    return {"fullest": fullest(times), "started": len(times),
            "achieved": (len(times) - rate) / (times[-1] - times[0]), **latency}


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
    parser.add_argument("--rounds", type=int, default=21)
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
         f"'{opts.rate}/s'; flow.app.worker_main(['worker', '-P', 'prefork', '-c', '2',"
         f" '-Q', 'flow,flow-plain', '-l', 'WARNING', '--without-gossip', '--without-mingle',"
         f" '--without-heartbeat', '-n', 'flow{n}@bench', '--logfile={folder}/w{n}.log'])"],
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
        alone = streamed(lambda: time.sleep(opts.seconds / 2))
        ours = precision("flow.limited", jobs, opts.rate, jobs / opts.rate * 3 + 60)
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
          " (prefork -c 2):")
    for name, row in (("global_rate_limit", ours), ("Celery's rate_limit", celerys)):
        print(f"  {name:<20} fullest second {row['fullest']:>4} (limit {opts.rate});"
              f" achieved {row['achieved']:7.2f}/s after the first burst"
              f" ({row['achieved'] / opts.rate:.3f} of the limit); {row['started']} started")
    print(f"scripts (EVALSHA) per job, enqueue and run (median of 3 runs of 500, nothing"
          f" waiting): plain {cost['flow.plain']:.2f}, rate-limited"
          f" {cost['flow.limited']:.2f}: the enqueue's push, in place of kombu's LPUSH,"
          f" and one round trip at the start")
    print(f"plain jobs every 50 ms on their own queue, same workers, start latency p50 / p99"
          f" (ms): alone {alone['p50'] * 1e3:.1f} / {alone['p99'] * 1e3:.1f}; beside the"
          f" limited backlog {ours['p50'] * 1e3:.1f} / {ours['p99'] * 1e3:.1f} (p99"
          f" {ours['p99'] / alone['p99']:.2f}x alone); p99 once the backlog is taken in"
          f" (every job received and parked): alone {alone['p99_settled'] * 1e3:.1f}, beside it"
          f" {ours['p99_settled'] * 1e3:.1f} ({ours['p99_settled'] / alone['p99_settled']:.2f}x);"
          f" beside Celery's {celerys['p50'] * 1e3:.1f} / {celerys['p99'] * 1e3:.1f}")
    print(f"per call, median of {opts.rounds} paired rounds of 200 (this process):")
    for name, (micros, sent) in calls.items():
        print(f"  {name:<9} {micros:7.0f} µs  {sent:.2f} scripts"
              f"  ({micros / calls['plain'][0]:.2f}x plain)")


if __name__ == "__main__":
    main()
