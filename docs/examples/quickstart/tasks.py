import os

from celery import Celery

from celery_unique import UniqueTask

app = Celery("tasks", broker=os.environ.get("BROKER_URL", "redis://localhost:6379/0"))


@app.task(base=UniqueTask, queueing_lock="report_<email>")
def send_pdf_report(email):
    print(f"report sent to {email}")


@app.task(base=UniqueTask, lock="alphabet.txt")
def write_letter(letter):
    with open("alphabet.txt", "a") as f:
        f.write(letter)
