from tasks import send_pdf_report, write_letter

from celery_unique import AlreadyQueued

send_pdf_report.delay("alice@example.com")  # queued
try:
    send_pdf_report.delay("alice@example.com")  # alice's report is queued already
except AlreadyQueued as exc:
    print(f"already queued: {exc.task_id} holds {exc.key}, {exc.ttl:.0f} s left")
send_pdf_report.delay("bob@example.com")  # queued: a lock of its own

for letter in "abcdef":
    write_letter.delay(letter)  # run one at a time, in creation order: "abcdef"
