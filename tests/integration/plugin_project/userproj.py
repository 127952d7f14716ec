"""A user's project: its tasks, with the plugin enabled in its conftest."""

from celery import Celery

from celery_unique import UniqueTask

app = Celery("userproj", broker="memory://", set_as_current=False)


@app.task(base=UniqueTask, queueing_lock="report_<email>")
def report(email):
    return email


@app.task(base=UniqueTask, lock="printer", on_locked="skip")
def print_page(page):
    return page


@app.task(base=UniqueTask, lock="printer")
def print_book(pages):
    # The printer is this job's: a page sent meanwhile is skipped, as on a worker.
    return print_page.delay(1).state
