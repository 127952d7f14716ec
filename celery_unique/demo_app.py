"""The demo's Celery app: what ``python -m celery_unique demo`` runs in its worker.

The Redis server's URL comes from ``CELERY_UNIQUE_DEMO_REDIS`` (set by the demo).
"""

from __future__ import annotations

import os
import random
import time

from celery import Celery

from .task import UniqueTask

SERVER = os.environ.get("CELERY_UNIQUE_DEMO_REDIS", "redis://127.0.0.1:6379")
app = Celery("celery_unique_demo", broker=f"{SERVER}/0", backend=f"{SERVER}/1")
app.conf.update(unique_redis_url=f"{SERVER}/0", worker_hijack_root_logger=False,
                broker_connection_retry_on_startup=True)


@app.task(  # type: ignore[untyped-decorator]
    base=UniqueTask, queueing_lock="report_<email>", name="demo.send_pdf_report"
)
def send_pdf_report(email: str) -> str:
    """A slow report: duplicates sent while one is waiting are not queued."""
    time.sleep(0.5)
    return f"report sent to {email}"


def _write(path: str, letter: str) -> None:
    time.sleep(random.random() * 0.1)  # jobs of uneven length: they finish out of order
    with open(path, "a") as f:
        f.write(letter)


@app.task(name="demo.write_letter", ignore_result=True)  # type: ignore[untyped-decorator]
def write_letter(path: str, letter: str) -> None:
    """Without a lock: two processes write at once, in whatever order they finish."""
    _write(path, letter)


@app.task(  # type: ignore[untyped-decorator]
    base=UniqueTask, lock="{path}", name="demo.write_letter_locked", ignore_result=True
)
def write_letter_locked(path: str, letter: str) -> None:
    """The seed's alphabet: one job at a time per file, in creation order."""
    _write(path, letter)
