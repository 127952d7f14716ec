"""Listing many locks: ``celery unique locks --json`` and the admin API over 1,000,000.

Creates N queueing locks and N/10 execution locks (a holder and two jobs waiting each)
on a private Redis server, then times the API's full iteration and the command's JSON
listing to /dev/null, each with its peak memory (the listing is streamed).

    python bench/locks.py [--locks 1000000]
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis
from celery import Celery

from celery_unique import admin
from celery_unique.testing import RedisServer

APP = '''
import os
from celery import Celery
app = Celery("bench_locks", broker=os.environ["BENCH_REDIS"])
'''


def fill(client: redis.Redis, locks: int) -> None:
    pipe = client.pipeline(transaction=False)
    for n in range(locks):
        pipe.set(f"celery_unique:q:{{bench.report:report_{n}}}", f"job-{n}", px=3_600_000)
        if n % 10 == 0:
            base = f"celery_unique:l:{{res_{n}}}"
            pipe.zadd(f"{base}:holders", {f"holder-{n}": time.time() * 1000 + 60_000})
            pipe.zadd(f"{base}:line", {f"a-{n}": 1, f"b-{n}": 2})
            pipe.set(f"{base}:seq", 2)
        if n % 10_000 == 9_999:
            pipe.execute()
    pipe.execute()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--locks", type=int, default=1_000_000)
    opts = parser.parse_args()
    with RedisServer() as server:
        url = f"{server.url}/0"
        client = redis.Redis.from_url(url)
        start = time.perf_counter()
        fill(client, opts.locks)
        print(f"created {opts.locks:,} queueing locks and {opts.locks // 10:,} locks in"
              f" {time.perf_counter() - start:.1f} s")

        app = Celery("bench_locks", broker=url, set_as_current=False)
        start = time.perf_counter()
        counted = sum(1 for _ in admin.iter_locks(app))
        took = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"admin.iter_locks: {counted:,} locks in {took:.1f} s"
              f" (this process's peak RSS {peak:.0f} MB)")

        with tempfile.TemporaryDirectory() as folder:
            Path(folder, "bench_locks_app.py").write_text(APP)
            env = {**os.environ, "BENCH_REDIS": url,
                   "PYTHONPATH": f"{folder}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
            start = time.perf_counter()
            with open(os.devnull, "w") as devnull:
                done = subprocess.run(
                    [sys.executable, "-c", "import resource, runpy, sys;"
                     " sys.argv = ['celery', '-A', 'bench_locks_app', 'unique', 'locks',"
                     " '--json'];"
                     " exit_code = 0\n"
                     "try:\n runpy.run_module('celery', run_name='__main__')\n"
                     "except SystemExit as exc:\n exit_code = exc.code or 0\n"
                     "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,"
                     " file=sys.stderr)\nsys.exit(exit_code)"],
                    env=env, stdout=devnull, stderr=subprocess.PIPE, text=True, check=True)
            took = time.perf_counter() - start
            peak = int(done.stderr.strip().splitlines()[-1]) / 1024
        print(f"celery unique locks --json > /dev/null: {took:.1f} s, peak RSS {peak:.0f} MB"
              " (bars: under 30 s, under 200 MB)")


if __name__ == "__main__":
    main()
