# from celery_singleton import Singleton, DuplicateTaskError, clear_locks
from celery.signals import worker_ready

from celery_unique.compat import DuplicateTaskError, Singleton, clear_locks
from proj.celery import app


@app.task(base=Singleton, unique_on=["username"], lock_expiry=60)
def do_something(username, otherarg=None):
    ...


@app.task(base=Singleton, raise_on_duplicate=True)
def import_user(username):
    ...


def start_import(username):
    try:
        return import_user.delay(username).id
    except DuplicateTaskError as e:
        return f"a duplicate of task {e.task_id}"


@worker_ready.connect
def unlock_all(**kwargs):
    clear_locks(app)   # rarely needed here: every end of a job releases its lock
