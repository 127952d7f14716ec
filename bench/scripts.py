"""Redis server time per lock script, beside the cookbook lock's commands.

Runs each script of a job with a lock (its place in line at enqueue, the take, the
release) 3,000 times on distinct locks, as ``bench/execute.py``'s jobs do, and reads the
server's own time per call (``INFO commandstats``): what a job costs the Redis it shares
with the broker, without the network or the client. The cookbook lock is ``SET NX PX`` and
a ``GET``/``DEL`` script. Medians over rounds.

    python bench/scripts.py [--calls 3000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import redis

from celery_unique.store import Store
from celery_unique.testing import RedisServer


def per_call(client: redis.Redis, command: str, run: Callable[[Any], Any],
             items: Iterable[Any]) -> float:
    """µs of server time per call of ``command`` while ``run`` goes over ``items``."""
    client.config_resetstat()
    for item in items:
        run(item)
    stats = client.info("commandstats")[f"cmdstat_{command}"]
    return float(stats["usec"]) / float(stats["calls"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5)
    opts = parser.parse_args()
    server = RedisServer().start()
    try:
        store = Store.from_url(f"{server.url}/0")
        client = redis.Redis.from_url(f"{server.url}/0")
        cookbook_release = client.register_script(
            "if redis.call('get', KEYS[1]) == ARGV[1] then"
            " return redis.call('del', KEYS[1]) end return 0")
        results: dict[str, list[float]] = {}
        for n in range(opts.rounds):
            jobs = [(f"celery_unique:l:{{b{n}-{i}}}", uuid.uuid4().hex)
                    for i in range(opts.calls)]
            for name, command, run in (
                ("place in line (enqueue)", "evalsha",
                 lambda j: store.enter_line(j[0], j[1], 3_600_000)),
                ("take", "evalsha", lambda j: store.acquire_lock(
                    j[0], token=j[1], limit=1, lease_ms=60_000, mode="order",
                    wait_ms=3_600_000, run=f"{j[1]}:0")),
                ("release", "evalsha", lambda j: store.release_lock(
                    j[0], token=j[1], limit=1, lease_ms=60_000, ran=f"{j[1]}:0",
                    remember_ms=60_000)),
                ("cookbook take", "set", lambda j: client.set(
                    f"cook:{j[0]}", j[1], nx=True, px=60_000)),
                ("cookbook release", "evalsha", lambda j: cookbook_release(
                    keys=[f"cook:{j[0]}"], args=[j[1]])),
            ):
                results.setdefault(name, []).append(per_call(client, command, run, jobs))
    finally:
        server.stop()
    print(f"Redis server time per call (µs), median of {opts.rounds} rounds of"
          f" {opts.calls} distinct locks")
    for name, values in results.items():
        print(f"{name:<26}{statistics.median(values):7.1f}   "
              f"({', '.join(f'{v:.1f}' for v in values)})")


if __name__ == "__main__":
    main()
