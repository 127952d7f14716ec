from celery_unique import AlreadyQueued, UniqueTask
from proj.celery import app
from proj.services import generate_report


@app.task(base=UniqueTask, queueing_lock="report_<email>")
def send_pdf_report(email):
    report = generate_report(email)
    report.send(email=email)


def request_report(email):
    """What the web view calls when the user submits the form."""
    try:
        send_pdf_report.delay(email)
    except AlreadyQueued:
        return "Your report is already on its way."
    return "Your report will be in your inbox in a minute."
