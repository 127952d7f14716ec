from celery_unique import admin
from proj.celery import app


def release_abandoned_lines():
    """Release the locks whose holders are gone while jobs still wait behind them."""
    released = []
    for lock in admin.iter_locks(app, kind="lock"):
        if lock.waiting and not lock.holders:
            admin.release(app, lock.key)
            released.append(lock.key)
    return released
