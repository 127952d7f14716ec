"""A broker restart during enqueues: does the worker survive, and are jobs lost?

Side by side, in alternating runs: a plain Celery app and the same app with
celery-unique (a queueing lock and a lock per job, the locks in the broker's database,
the default). Each run starts a private Redis with an append-only file, a prefork worker
of 2 processes, and a publisher of 40 jobs; the Redis server is SIGKILLed while the
publisher is halfway, restarted from its AOF on the same port a second later, and the
publisher goes on. The run then waits for the jobs to run (or 30 s) and reports whether
the worker's main process is alive, how many of the jobs published ran, and whether its
log holds kombu's ``restore_unacked`` error.

    python bench/broker_restart.py [--runs 10]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import redis

from celery_unique.testing import RedisServer

APP = '''
import os, time
from celery import Celery
from celery_unique import UniqueTask

app = Celery("restart", broker=os.environ["BENCH_REDIS"])
app.conf.update(task_default_queue="restart", broker_connection_retry_on_startup=True,
                task_publish_retry=True, unique_lock_timeout=5,
                broker_transport_options={"visibility_timeout": 5,
                                          "unacked_restore_interval": 1})
coord_url = os.environ["BENCH_COORD"]
unique = os.environ["BENCH_UNIQUE"] == "1"
options = dict(base=UniqueTask, queueing_lock="q_{n}", lock="l_{n}") if unique else {}

@app.task(name="restart.job", shared=False, **options)
def job(n):
    import redis
    time.sleep(0.05)
    redis.Redis.from_url(coord_url).sadd("ran", n)
'''


def start_worker(folder: Path, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], Path]:
    log = folder / f"worker-{uuid.uuid4().hex[:6]}.log"
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "restart_app", "worker", "-P", "prefork",
         "-c", "2", "-l", "INFO", "--without-gossip", "--without-mingle",
         "--without-heartbeat", "-Q", "restart", f"--logfile={log}"],
        cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        start_new_session=True)
    deadline = time.monotonic() + 60
    while "ready." not in (log.read_text() if log.exists() else ""):
        if time.monotonic() > deadline or worker.poll() is not None:
            raise RuntimeError(f"the worker did not start:\n{log.read_text()}")
        time.sleep(0.1)
    return worker, log


def stop(worker: subprocess.Popen[bytes]) -> None:
    if worker.poll() is None:
        worker.terminate()
        try:
            worker.wait(20)
        except subprocess.TimeoutExpired:
            worker.kill()


def one_run(unique: bool, folder: Path) -> dict[str, object]:
    coord = RedisServer().start()  # never restarted: where jobs say they ran
    server = RedisServer("--appendonly", "yes", "--appendfsync", "always").start()
    env = {**os.environ, "BENCH_REDIS": f"{server.url}/0", "BENCH_COORD": coord.url,
           "BENCH_UNIQUE": "1" if unique else "0", "PYTHONPATH": str(folder)}
    worker, log = start_worker(folder, env)
    published = 0
    try:
        sys.path.insert(0, str(folder))
        os.environ.update({k: env[k] for k in ("BENCH_REDIS", "BENCH_COORD", "BENCH_UNIQUE")})
        import importlib

        import restart_app

        importlib.reload(restart_app)
        for n in range(40):
            if n == 20:
                server.kill()
                time.sleep(1.0)  # the outage: the fault's length, not a wait
                server.start()
            try:
                restart_app.job.delay(n)
                published += 1
            except Exception:
                pass  # the broker was down for this one: not published
            time.sleep(0.02)
        client = redis.Redis.from_url(coord.url)
        deadline = time.monotonic() + 30
        while client.scard("ran") < published and time.monotonic() < deadline:
            if worker.poll() is not None:
                break
            time.sleep(0.2)
        ran = client.scard("ran")
        alive = worker.poll() is None
        text = log.read_text(errors="replace")
        # Then as a supervisor would: a new worker; the dead one's unacknowledged messages
        # come back after the visibility timeout (5 s here).
        stop(worker)
        worker, _ = start_worker(folder, env)
        deadline = time.monotonic() + 40
        while client.scard("ran") < published and time.monotonic() < deadline:
            time.sleep(0.2)
        return {"alive": alive, "published": published, "ran": ran,
                "ran_after_restart": client.scard("ran"),
                "restore_error": "restore_unacked" in text and "AttributeError" in text}
    finally:
        stop(worker)
        server.stop()
        coord.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=10)
    opts = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="celery-unique-restart-"))
    (folder / "restart_app.py").write_text(APP)
    results: dict[str, list[dict[str, object]]] = {"plain": [], "unique": []}
    for run in range(opts.runs):
        for name in (("plain", "unique") if run % 2 == 0 else ("unique", "plain")):
            result = one_run(name == "unique", folder)
            results[name].append(result)
            print(name, result, flush=True)
    for name, rows in results.items():
        alive = sum(bool(r["alive"]) for r in rows)
        stuck = sum(int(str(r["published"])) - int(str(r["ran"])) for r in rows)
        lost = sum(int(str(r["published"])) - int(str(r["ran_after_restart"])) for r in rows)
        errors = sum(bool(r["restore_error"]) for r in rows)
        print(f"{name:<7} worker alive after {alive}/{len(rows)} runs; jobs not run by it:"
              f" {stuck}; never run, even by a restarted worker: {lost};"
              f" kombu's restore_unacked error in {errors} logs")


if __name__ == "__main__":
    main()
