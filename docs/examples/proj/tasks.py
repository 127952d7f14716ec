"""The tasks the how-tos' shell commands name (``celery -A proj unique ...``)."""

from celery_unique import UniqueTask
from proj.celery import app
from proj.services import generate_report, remove_stale_sessions


@app.task(base=UniqueTask, name="tasks.send_report", queueing_lock="report_<email>")
def send_report(email):
    generate_report(email).send(email=email)


@app.task(base=UniqueTask, name="tasks.maintenance")
def maintenance():
    remove_stale_sessions()


@app.task(base=UniqueTask, name="proj.tasks.cleanup")
def cleanup(**kwargs):
    remove_stale_sessions()
