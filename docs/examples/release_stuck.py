from celery_unique import admin
from proj.celery import app


def release_dead_holders():
    """Give on the locks whose holders died (their lease ran out, nothing renews it),
    without waiting for a worker's sweep; live holders are left alone."""
    released = []
    for lock in admin.iter_locks(app, kind="lock"):
        if "lease expired" in lock.holder_status():
            admin.release(app, lock.key, dead=True)
            released.append(lock.key)
    return released
