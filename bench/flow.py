"""Flow control, measured: the global rate limit's precision and cost across workers, and
what replace and debounce cost a caller.

Starts a private Redis (broker and lock store: the atomic path) and ``--workers`` worker
processes (``celery worker``, prefork ``-c 2`` each) consuming one queue.

1. **Precision.** ``rate * seconds`` jobs published at once under
   ``global_rate_limit=f"{rate}/s"`` (one key); each job records its start. Printed: the
   fullest window of one second (never above the limit), and the rate achieved after the
   first burst (the limit's share). Then the same jobs under Celery's own
   ``rate_limit`` (per worker process), measured the same way.
2. **Cost per start.** Redis commands sent by clients per job (``INFO commandstats``),
   limited jobs minus plain ones, in the same workers.
3. **Jobs without a limit are not slowed.** While the limited backlog waits, a plain
   job is sent every 50 ms through the same queue; their start latency (start minus
   send), p50 and p99, against the same plain stream with no limited jobs.
4. **Replace and debounce per call**, in this process: µs and Redis commands per call
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


def client_commands(client: redis.Redis) -> int:
    """Commands sent by clients so far (scripts' own commands left out)."""
    stats = client.info("commandstats")
    lua = {"cmdstat_" + c for c in ("get", "set", "del", "zadd", "zrem", "zcard", "zscore",
                                    "zrange", "zrangebyscore", "hset", "hdel", "hexists",
                                    "hget", "pexpire", "pttl", "time", "incr", "exists",
                                    "zremrangebyscore", "zrank", "hgetall", "zcount")}
    return sum(v["calls"] for k, v in stats.items() if k not in lua)


def stream_plain(run: str, stop: threading.Event) -> None:
    """A plain job every 50 ms until ``stop``; each records its start and its send."""
    n = 0
    while not stop.is_set():
        plain.apply_async((run, n, time.time()))
        n += 1
        stop.wait(0.05)


def latencies(run: str) -> list[float]:
    return sorted(start - sent for _, start, sent in rows(run))


def percentile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))]


def precision(name: str, jobs: int, rate: int, client: redis.Redis) -> dict[str, Any]:
    """Publish ``jobs`` jobs of ``name`` at once, stream plain jobs meanwhile; measure."""
    task, run, stream = app.tasks[name], f"{name}-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    options = {"global_rate_limit": f"{rate}/s"} if name == "flow.limited" else {}
    stop = threading.Event()
    streamer = threading.Thread(target=stream_plain, args=(stream, stop))
    before = client_commands(client)
    for n in range(jobs):
        task.apply_async((run, n), **options)
    streamer.start()
    try:
        wait_for(lambda: len(rows(run)) >= jobs, timeout=jobs / rate * 3 + 60, interval=0.2,
                 what=f"{jobs} {name} jobs")
    finally:
        stop.set()
        streamer.join()
    wait_for(lambda: len(rows(stream)) >= 1, timeout=30, what="the plain stream")
    commands = client_commands(client) - before
    times = sorted(start for _, start, _ in rows(run))
    lat = latencies(stream)
    return {"fullest": fullest(times), "achieved": (jobs - rate) / (times[-1] - times[0]),
            "commands": commands / jobs, "p50": percentile(lat, 0.5),
            "p99": percentile(lat, 0.99), "plain_jobs": len(lat)}


def per_call(rounds: int) -> dict[str, tuple[float, float]]:
    """µs and Redis commands per call, paired rounds (the order changes every round)."""
    client = redis.Redis.from_url(f"{SERVER}/0")
    calls = {"plain": lambda k: plain.apply_async(("x", 0)),
             "replace": lambda k: replaced.apply_async((k,)),
             "debounce": lambda k: debounced.apply_async((k,))}
    times: dict[str, list[float]] = {name: [] for name in calls}
    commands: dict[str, list[float]] = {name: [] for name in calls}
    keys = [uuid.uuid4().hex for _ in range(4)]  # each call replaces the one before it
    names = list(calls)
    for r in range(rounds):
        for name in names[r % 3:] + names[:r % 3]:
            before, start = client_commands(client), time.perf_counter()
            for i in range(200):
                calls[name](keys[i % 4])
            times[name].append((time.perf_counter() - start) / 200 * 1e6)
            commands[name].append((client_commands(client) - before) / 200)
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
         f" '-Q', 'flow', '-l', 'WARNING', '--without-gossip', '--without-mingle',"
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
        baseline = precision("flow.plain", opts.rate * 10, opts.rate, client)
        ours = precision("flow.limited", jobs, opts.rate, client)
        celerys = precision("flow.celery_limited", jobs, opts.rate, client)
        calls = per_call(opts.rounds)
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

    print(f"{jobs} jobs at {opts.rate}/s, {opts.workers} worker processes (prefork -c 2):")
    for name, row in (("global_rate_limit", ours), ("Celery's rate_limit", celerys)):
        print(f"  {name:<20} fullest second {row['fullest']:>4} (limit {opts.rate});"
              f" achieved {row['achieved']:7.2f}/s ({row['achieved'] / opts.rate:.3f} of the"
              f" limit); {row['commands']:.2f} client commands per job")
    print(f"  plain jobs without a limit ({baseline['commands']:.2f} client commands per"
          f" job): {ours['commands'] - baseline['commands']:.2f} more per limited job")
    print(f"plain jobs sent every 50 ms meanwhile, start latency p50 / p99 (ms): alone"
          f" {baseline['p50'] * 1e3:.1f} / {baseline['p99'] * 1e3:.1f}; beside the limited"
          f" backlog {ours['p50'] * 1e3:.1f} / {ours['p99'] * 1e3:.1f}"
          f" (p99 ratio {ours['p99'] / baseline['p99']:.2f}); beside Celery's"
          f" {celerys['p50'] * 1e3:.1f} / {celerys['p99'] * 1e3:.1f}")
    print(f"per call, median of {opts.rounds} paired rounds of 200 (this process):")
    for name, (micros, sent) in calls.items():
        print(f"  {name:<9} {micros:7.0f} µs  {sent:.2f} commands"
              f"  ({micros / calls['plain'][0]:.2f}x plain)")


if __name__ == "__main__":
    main()
