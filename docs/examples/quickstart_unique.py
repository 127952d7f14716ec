from celery import Celery

from celery_unique import AlreadyQueued, UniqueTask

app = Celery("reports", broker="redis://localhost:6379/0")


@app.task(base=UniqueTask, queueing_lock="report_<email>")
def send_pdf_report(email):
    ...


send_pdf_report.delay("alice@example.com")   # queued
try:
    send_pdf_report.delay("alice@example.com")
except AlreadyQueued as exc:
    print(exc.key, exc.task_id, exc.ttl)     # the key, the queued job, seconds left
send_pdf_report.delay("bob@example.com")     # queued: its own lock
