"""Execution cost of the lock: plain Celery, the peers and celery-unique, side by side.

Starts a private Redis server (broker and lock store) and one ``celery worker`` (prefork,
``--concurrency 4``) running this module. Each round publishes ``--jobs`` no-op jobs per
variant to a queue of their own, then has the worker consume it; every job writes when
its body started and ended. Throughput is jobs over the time from the first start to the
last end, so it holds every job's locking but the first take and the last release.

Variants (distinct keys: nobody waits):

- ``plain``: ``celery.Task``.
- ``celery-once``: ``QueueOnce`` (its lock is taken at enqueue and deleted when the job
  ends: one command on the worker).
- ``cookbook``: the Celery cookbook's lock, done right (``SET NX PX`` on start, an
  owner-checked delete in Lua at the end: two commands).
- ``celery-unique``: ``lock="{key}"`` (two commands: take, release).
- ``unique+queueing``: ``queueing_lock="{key}", lock="{key}"`` (still two: taking the
  lock releases the queueing lock in the same script).
- ``unique-skip``: ``lock="{key}", on_locked="skip"``: the same two commands, without a
  line (no place taken at enqueue, none kept while the worker holds the message).

Then, in ``"order"`` mode, ``--ordered`` jobs share one lock: the delay from one job's
end to the next one's start (release, publishing the woken job again, the broker, the
worker, taking the lock) is printed as median, p90 and max.

    python bench/execute.py [--jobs 2000] [--rounds 3] [--ordered 300]

Each round runs every variant beside a run of plain Celery's of its own (just before or
just after it, in turn), starting with another variant each round; a variant's ratio is
the median over rounds of its throughput over that plain run's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import redis
from celery import Celery, Task, signals

from celery_unique import UniqueTask
from celery_unique.testing import RedisServer, wait_for

SERVER = os.environ.get("BENCH_REDIS", "redis://127.0.0.1:6379")
RECORD = Path(os.environ.get("BENCH_RECORD", tempfile.gettempdir()))
VARIANTS = ["plain", "celery-once", "cookbook", "celery-unique", "unique+queueing",
            "unique-skip"]

app = Celery("bench_execute", broker=f"{SERVER}/0", set_as_current=False)
app.conf.update(
    unique_redis_url=f"{SERVER}/1",
    ONCE={"backend": "celery_once.backends.Redis",
          "settings": {"url": f"{SERVER}/2", "default_timeout": 3600}},
    task_default_queue="bench-idle",
    task_ignore_result=True,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
)
_files: dict[str, Any] = {}


def record(run: str, n: int, start: float) -> None:
    """One line per job: ``n start end`` in a file per run and process."""
    f = _files.get(run)
    if f is None:
        f = _files[run] = open(RECORD / f"{run}.{os.getpid()}", "a", buffering=1)  # noqa: SIM115
    f.write(f"{n} {start:.6f} {time.time():.6f}\n")


@app.task(name="plain", shared=False)
def plain(run: str, key: str, n: int) -> None:
    record(run, n, time.time())


def _once() -> Any:
    from celery_once import QueueOnce

    @app.task(name="celery-once", base=QueueOnce, shared=False, once={"keys": ["key"]})
    def once(run: str, key: str, n: int) -> None:
        record(run, n, time.time())

    return once


once = _once()

# The cookbook's lock (cache.add, then cache.delete), made safe: an owner token and a
# compare-and-delete, as every correct Redis lock needs.
_cookbook_redis = redis.Redis.from_url(f"{SERVER}/3")
_cookbook_release = _cookbook_redis.register_script(
    "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end"
    " return 0")


@app.task(name="cookbook", shared=False, bind=True)
def cookbook(self: Task, run: str, key: str, n: int) -> None:
    lock, token = f"cookbook:{key}", self.request.id
    if not _cookbook_redis.set(lock, token, nx=True, px=60_000):
        raise self.retry(countdown=0.1)
    try:
        record(run, n, time.time())
    finally:
        _cookbook_release(keys=[lock], args=[token])


@app.task(name="celery-unique", base=UniqueTask, lock="{key}", shared=False)
def unique(run: str, key: str, n: int) -> None:
    record(run, n, time.time())


@app.task(name="unique+queueing", base=UniqueTask, queueing_lock="{key}", lock="{key}",
          shared=False)
def unique_queueing(run: str, key: str, n: int) -> None:
    record(run, n, time.time())


@app.task(name="unique-skip", base=UniqueTask, lock="{key}", on_locked="skip", shared=False)
def unique_skip(run: str, key: str, n: int) -> None:
    record(run, n, time.time())


@signals.worker_ready.connect
def _ready(**_: Any) -> None:
    (RECORD / "ready").touch()


# -- the driver --------------------------------------------------------------------------

def read(run: str) -> list[tuple[int, float, float]]:
    rows = []
    for path in RECORD.glob(f"{run}.*"):
        for line in path.read_text().splitlines():
            n, start, end = line.split()
            rows.append((int(n), float(start), float(end)))
    return rows


WORKER = f"bench-{os.getpid()}@bench"


#: The processes whose CPU time is counted per job: the worker's main process, its pool
#: (the main process's children), read in ``/proc`` (Linux only), and the Redis server, by
#: its own count (``INFO cpu``).
WATCHED: dict[str, int] = {}
TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds() -> dict[str, float]:
    """CPU time used so far by each watched part (empty where ``/proc`` is not)."""
    used: dict[str, float] = {}

    def of(pid: int) -> float:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime

    try:
        for part, pid in WATCHED.items():
            if part == "redis":  # the server's own count (getrusage), to the µs
                cpu = redis.Redis.from_url(app.conf.broker_url).info("cpu")
                used[part] = float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])
                continue
            used[part] = of(pid)
            if part == "main":
                children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
                used["pool"] = sum(of(int(child)) for child in children)
    except OSError:
        return {}
    return used


def run_jobs(name: str, jobs: int, key: Any, cpu: dict[str, list[float]] | None = None
             ) -> list[tuple[int, float, float]]:
    """Publish ``jobs`` jobs to a queue nobody consumes, then let the worker drain it;
    ``cpu``: where the CPU time per job (µs) of each watched part is added."""
    task = app.tasks[name]
    run = f"{name}-{uuid.uuid4().hex[:8]}"
    queue = f"bench-{run}"
    for n in range(jobs):
        task.apply_async((run, key(n), n), queue=queue)
    # One worker: its reply ends the wait (without a limit, Celery waits out the timeout).
    control = {"destination": [WORKER], "reply": True, "limit": 1, "timeout": 10}
    before = cpu_seconds()
    app.control.add_consumer(queue, **control)
    try:
        wait_for(lambda: len(read(run)) >= jobs, timeout=600, interval=0.05,
                 what=f"{jobs} {name} jobs")
    finally:
        app.control.cancel_consumer(queue, **control)
    after = cpu_seconds()
    if cpu is not None and before and after:
        for part, used in after.items():
            cpu.setdefault(part, []).append((used - before[part]) * 1e6 / jobs)
    return read(run)


def throughput(rows: list[tuple[int, float, float]]) -> float:
    return len(rows) / (max(r[2] for r in rows) - min(r[1] for r in rows))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ordered", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=4)
    opts = parser.parse_args()

    server = RedisServer().start()
    record_dir = Path(tempfile.mkdtemp(prefix="celery-unique-bench-"))
    env = {**os.environ, "BENCH_REDIS": server.url, "BENCH_RECORD": str(record_dir),
           "PYTHONPATH": f"{Path(__file__).parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    os.environ.update(BENCH_REDIS=server.url, BENCH_RECORD=str(record_dir))
    global RECORD
    RECORD = record_dir
    app.conf.broker_url = f"{server.url}/0"
    app.conf.unique_redis_url = f"{server.url}/1"
    app.conf.ONCE["settings"]["url"] = f"{server.url}/2"
    log = record_dir / "worker.log"
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "execute", "worker", "-P", "prefork",
         "-c", str(opts.concurrency), "-Q", "bench-idle", "-l", "WARNING",
         "--without-gossip", "--without-mingle", "--without-heartbeat",
         "-n", WORKER, f"--logfile={log}"],
        cwd=Path(__file__).parent, env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: (record_dir / "ready").exists() or worker.poll() is not None,
                 timeout=60, what="the worker")
        if worker.poll() is not None:
            sys.exit(f"the worker exited:\n{log.read_text()}")
        WATCHED.update(main=worker.pid, redis=server._process.pid)
        for name in VARIANTS:  # warm up every pool process, connection and script
            run_jobs(name, 200, lambda n: uuid.uuid4().hex)
        rates: dict[str, list[float]] = {name: [] for name in VARIANTS}
        # Each variant's run beside a run of plain Celery's of its own, just before or
        # just after it (in turn): the machine's speed drifts by 2x within minutes, and
        # within a round too, so a ratio to a plain run five runs away measures the drift.
        beside: dict[str, list[float]] = {name: [] for name in VARIANTS}
        cpu: dict[str, dict[str, list[float]]] = {name: {} for name in VARIANTS}
        others = VARIANTS[1:]
        for n in range(opts.rounds):
            # Each round starts with another variant, so that none keeps a favourable
            # place.
            for i, name in enumerate(others[n % len(others):] + others[:n % len(others)]):
                pair = ["plain", name] if (n + i) % 2 == 0 else [name, "plain"]
                got = {}
                for one in pair:
                    rows = run_jobs(one, opts.jobs, lambda n: uuid.uuid4().hex, cpu[one])
                    got[one] = throughput(rows)
                rates["plain"].append(got["plain"])
                rates[name].append(got[name])
                beside[name].append(got["plain"])
                beside["plain"].append(got["plain"])
        ordered = (run_jobs("celery-unique", opts.ordered, lambda n: "one")
                   if opts.ordered else [])
    finally:
        worker.terminate()
        worker.wait(30)
        server.stop()

    print(f"jobs per second, median of {opts.rounds} rounds of {opts.jobs} no-op jobs"
          f" (one worker, prefork -c {opts.concurrency}; distinct keys; the variants' order"
          " rotated each round). The ratio is the median over rounds of each round's own"
          " ratio to a run of plain Celery's just before or after it (paired: the machine's"
          " speed drifts within minutes).")
    for name in VARIANTS:
        rate = statistics.median(rates[name])
        paired = [r / p for r, p in zip(rates[name], beside[name])]
        rounds = (f"(per round: {', '.join(f'{r:.2f}' for r in paired)})"
                  if name != "plain" else f"({len(paired)} runs, one beside each other run)")
        print(f"{name:<18}{rate:>9.0f}/s  {statistics.median(paired):>5.2f}x plain   {rounds}")
    if cpu["plain"]:
        # The machine has 2 CPUs for 4 pool processes, the main process and Redis: every
        # part's CPU time counts against throughput, wherever it is spent.
        print("CPU time per job (µs, median over rounds), by part: worker's main process,"
              " pool processes, Redis server; added to plain Celery's")
        for name in VARIANTS:
            parts = {part: statistics.median(v) for part, v in cpu[name].items()}
            plain_parts = {part: statistics.median(v) for part, v in cpu["plain"].items()}
            print(f"{name:<18}" + "  ".join(
                f"{part} {parts[part]:6.0f} ({parts[part] - plain_parts[part]:+5.0f})"
                for part in ("main", "pool", "redis")))
    ratio = statistics.median(
        [r / p for r, p in zip(rates["celery-unique"], beside["celery-unique"])])
    print(f"celery-unique throughput / plain Celery's: {ratio:.2f} (bar >= 0.95)")

    if not ordered:
        return
    ordered.sort(key=lambda r: r[1])
    in_order = [r[0] for r in ordered] == sorted(r[0] for r in ordered)
    overlap = any(b[1] < a[2] for a, b in zip(ordered, ordered[1:]))
    gaps = [(b[1] - a[2]) * 1000 for a, b in zip(ordered, ordered[1:])]
    worst = max(range(len(gaps)), key=gaps.__getitem__)
    gaps.sort()
    print(f'"order" mode, {opts.ordered} jobs on one lock: ran in creation order: {in_order},'
          f" overlapped: {overlap}")
    print(f"end of one job -> start of the next (ms): median {statistics.median(gaps):.1f},"
          f" p90 {gaps[int(len(gaps) * 0.9)]:.1f}, max {gaps[-1]:.1f} (after job {worst})"
          " (bar: median <= 50)")


if __name__ == "__main__":
    main()
