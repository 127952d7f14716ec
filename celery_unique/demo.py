"""The demo: ``python -m celery_unique demo`` (its Celery app is :mod:`.demo_app`)."""

from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from .testing import RedisServer, wait_for

__all__ = ["main"]


def demo() -> int:
    """Start a private Redis and a worker; show the queueing lock, then the lock."""
    with RedisServer() as server:
        os.environ["CELERY_UNIQUE_DEMO_REDIS"] = server.url
        from . import demo_app

        log = Path(tempfile.mkstemp(prefix="celery-unique-demo-", suffix=".log")[1])
        print(f"private Redis at {server.url}; starting a worker (prefork, 2 processes)")
        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "celery_unique.demo_app", "worker", "-P",
             "prefork", "-c", "2", "-l", "INFO", "--without-gossip", "--without-mingle",
             "--without-heartbeat", f"--logfile={log}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, env=os.environ.copy(),
        )
        try:
            def ready() -> bool:
                if worker.poll() is not None:
                    raise RuntimeError(f"the demo's worker exited:\n{log.read_text()}")
                return "ready." in log.read_text()

            wait_for(ready, timeout=60, what="the worker")
            _queueing_demo(demo_app)
            # Its results sit in reference cycles: collect them while the server runs (at
            # exit, Celery < 5.6 would retry unsubscribing from a stopped server for 20 s).
            gc.collect()
            print()
            _lock_demo(demo_app)
        finally:
            worker.terminate()
            worker.wait(30)
    return 0


def _queueing_demo(demo_app: Any) -> None:
    """The queueing lock: a burst of duplicate enqueues."""
    from .exceptions import AlreadyQueued

    emails = ["alice@example.com", "bob@example.com", "carol@example.com"]
    queued, outcome = [], Counter[str]()
    print("burst: 30 enqueues, 10 per user, with send_pdf_report.delay(email)")
    for _round in range(10):
        for email in emails:
            try:
                queued.append(demo_app.send_pdf_report.delay(email))
                outcome[f"queued   {email}"] += 1
            except AlreadyQueued as exc:
                outcome[f"rejected {email}"] += 1
                last = str(exc)  # not the exception: its traceback would keep this frame
        time.sleep(0.05)
    for line, count in sorted(outcome.items()):
        print(f"  {line}: {count}")
    print(f"  e.g. AlreadyQueued: {last}")
    for result in queued:
        print(f"  ran {result.id[:8]}: {result.get(timeout=30)}")
    print("(the lock is released when a worker starts a job: at most one job per"
          " user waits in the queue; a duplicate gets AlreadyQueued)")
    print(f"{len(queued)} queued, {30 - len(queued)} rejected as duplicates,"
          f" {len(queued)} ran")


def _lock_demo(demo_app: Any) -> None:
    """The execution lock: the seed's alphabet, with and without ``lock``."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    print("the lock: 26 jobs append a letter each to a file, with random sleeps, on 2"
          " processes")
    for name, task in (("without lock", demo_app.write_letter),
                       ('lock="{path}"', demo_app.write_letter_locked)):
        path = Path(tempfile.mkdtemp(prefix="celery-unique-demo-")) / "alphabet.txt"
        for letter in letters:
            task.delay(str(path), letter)
        wait_for(lambda path=path: path.exists() and len(path.read_text()) == len(letters),
                 timeout=60, what="26 letters")
        print(f"  {name:<14} {path.read_text()}")
    print("(with the lock, jobs sharing it run one at a time in creation order; a waiting"
          " job gives its worker slot back until its turn)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m celery_unique")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="run the demo: a private Redis, a worker, duplicates and a lock")
    args = parser.parse_args(argv)
    if args.command == "demo":
        return demo()
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
