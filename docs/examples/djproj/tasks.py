import logging

from django.db import transaction

from celery_unique import AlreadyQueued, UniqueTask
from djproj.celery import app

logger = logging.getLogger(__name__)


@app.task(base=UniqueTask, queueing_lock="export_{user_id}")
def export_account(user_id):
    ...


def request_export(user_id):
    """Called inside the view's transaction: the job is queued once it commits."""
    transaction.on_commit(lambda: _enqueue_export(user_id))


def _enqueue_export(user_id):
    # An on_commit callback has no caller to tell: log the duplicate, do not raise.
    try:
        export_account.delay(user_id)
    except AlreadyQueued as exc:
        logger.info("export of %s already queued (job %s)", user_id, exc.task_id)
