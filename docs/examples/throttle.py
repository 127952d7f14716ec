from celery_unique import UniqueTask
from proj.celery import app
from proj.services import send_digest as send_digest_now


@app.task(base=UniqueTask, queueing_lock="digest_{user_id}",
          queueing_lock_until="expired", queueing_lock_timeout=3600)
def send_digest(user_id):
    """At most one digest per user per hour, however often it is asked for."""
    send_digest_now(user_id)
