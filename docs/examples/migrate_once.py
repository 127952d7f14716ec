# from celery_once import QueueOnce, AlreadyQueued
from celery_unique.compat import AlreadyQueued, QueueOnce
from proj.celery import app

app.conf.ONCE = {
    "backend": "celery_once.backends.Redis",
    "settings": {"url": "redis://localhost:6379/0", "default_timeout": 60 * 60},
}


@app.task(base=QueueOnce, once={"graceful": True, "keys": ["user_id"]})
def slow_task(user_id, force=False):
    ...


@app.task(base=QueueOnce)
def send_newsletter(list_id):
    ...


def send(list_id):
    try:
        send_newsletter.delay(list_id)
    except AlreadyQueued as exc:
        return f"already queued: {exc.message}"   # "Expires in 3599.9 seconds"
    return "queued"
