from celery_unique import UniqueTask
from proj.celery import app
from proj.services import charge_card, sync_account


@app.task(base=UniqueTask, lock=True, on_locked="skip")
def process_payment(user_id, amount):
    """que-locks' exclusive job: never two runs with the same arguments at once; one
    that finds another running is skipped."""
    charge_card(user_id, amount)


@app.task(base=UniqueTask, lock=True, unique_on=["user_id"], queueing_lock=True)
def rebuild_profile(user_id, reason="manual"):
    """One per user, whatever the reason: waiting in line to run, and never more than
    one queued (the queue stays small when many are sent at once)."""
    sync_account(f"user-{user_id}")
