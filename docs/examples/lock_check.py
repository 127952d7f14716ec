from celery_unique import UniqueTask
from proj.celery import app
from proj.services import import_feed as import_feed_now


@app.task(base=UniqueTask, lock="feed_{feed_url}", on_locked="skip",
          lock_check_at_enqueue=True, on_duplicate="existing")
def refresh_feed(feed_url):
    """Not even queued while an import of the feed runs: the caller gets its result."""
    return import_feed_now(feed_url)
