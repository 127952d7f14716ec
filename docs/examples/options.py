from celery_unique import UniqueTask
from proj.celery import app

app.conf.task_annotations = {"options.sync": {"queueing_lock_timeout": 600}}


@app.task(base=UniqueTask, queueing_lock=True, unique_on=["account"])
def sync(account, full=False):
    ...


def examples():
    sync.apply_async(("acme",), queueing_lock="sync-all", on_duplicate="existing")
    sync.configure(queueing_lock="maintenance").delay("acme")   # procrastinate's spelling
    sync.s("acme").set(queueing_lock="nightly").delay()         # signatures, chains, groups

