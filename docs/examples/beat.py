from celery_unique import UniqueTask
from proj.celery import app
from proj.services import remove_stale_sessions

app.conf.beat_schedule = {
    "cleanup-every-minute": {"task": "proj.cleanup", "schedule": 60.0},
}


@app.task(base=UniqueTask, name="proj.cleanup", queueing_lock="cleanup",
          queueing_lock_until="finished")
def cleanup():
    """Run by beat every minute; never twice at once, never piling up in the queue."""
    remove_stale_sessions()
