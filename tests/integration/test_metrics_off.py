"""Metrics off (the default): celery-unique imports, connects and records nothing for
them."""

from __future__ import annotations

import subprocess
import sys

from celery_unique.testing import RedisServer


def test_off_nothing_is_imported_connected_or_recorded(unique_redis_server: RedisServer) -> None:
    """A task with both locks, bound, enqueued and run on a real Redis: celery_unique.metrics
    is never imported and no receiver listens to celery-unique's signals. (redis-py 8 and
    fakeredis import OpenTelemetry themselves when it is installed: not counted here.)"""
    code = (
        "import sys\n"
        "from celery import Celery\n"
        "from celery_unique import UniqueTask\n"
        f"app = Celery('q', broker='{unique_redis_server.url}/2', set_as_current=False)\n"
        f"app.conf.unique_redis_url = '{unique_redis_server.url}/1'\n"
        "@app.task(base=UniqueTask, queueing_lock='off_{n}', lock='off_{n}', shared=False)\n"
        "def t(n): return n\n"
        "t.delay(1); t.apply((2,))\n"
        "from celery_unique import signals\n"
        "print('celery_unique.metrics' in sys.modules,\n"
        "      [s.name for s in (signals.duplicate_rejected, signals.lock_acquired,\n"
        "                        signals.lock_waiting, signals.lock_released,\n"
        "                        signals.lock_lost, signals.store_unavailable) if s.receivers])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "False []"
