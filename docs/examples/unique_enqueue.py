import contextlib

from celery_unique import AlreadyQueued, UniqueTask
from proj.celery import app
from proj.services import remove_stale_sessions


@app.task(base=UniqueTask)
def cleanup(**kwargs):
    remove_stale_sessions()


def schedule_cleanup():
    """Queue a cleanup unless one is still waiting: missing one now and then is fine."""
    with contextlib.suppress(AlreadyQueued):
        cleanup.configure(queueing_lock="maintenance").delay(a=1)


@app.task(base=UniqueTask, queueing_lock="my_lock_value_{param_1}")
def my_task(param_1="aaa", **kwargs):
    ...
