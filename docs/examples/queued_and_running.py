from celery_unique import UniqueTask
from proj.celery import app
from proj.services import sync_account


@app.task(base=UniqueTask, queueing_lock="sync_{account}", lock="sync_{account}")
def sync(account):
    """At most one sync of an account waiting and one running."""
    sync_account(account)
