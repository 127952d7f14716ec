from celery_unique import UniqueTask
from proj.celery import app
from proj.services import import_feed as import_feed_now


@app.task(base=UniqueTask, lock="feed_{feed_url}", on_locked="skip", lock_timeout=60)
def import_feed(feed_url):
    """Never two imports of one feed at once; a second one is skipped, not queued."""
    return import_feed_now(feed_url)
